#!/usr/bin/env python3
"""Generate tiny reference fixtures for loraplane's engine tests.

Produces, under --out (default: tests/fixtures/tiny relative to the repo root):

  tokenizer/                 shared byte-level BPE tokenizer (vocab 384) + generation_config.json
  llama/                     LlamaForCausalLM, float32, single model.safetensors
  llama31/                   Llama with llama3 rope scaling, tied embeddings, bfloat16, sharded
  mistral/                   MistralForCausalLM, float16, single file, 1 kv head
  qwen2/                     Qwen2ForCausalLM (q/k/v bias), tied embeddings, float32
  adapters/<name>/           PEFT LoRA adapters on `llama`
  reference.safetensors      prompts, float32 log-probs, greedy continuations, margins, mixed batch
  reference.json             metadata (versions, prompts, chat rendering, tokenization samples, ...)

Everything is computed on CPU in float32 with fixed seeds. References for the
bf16/f16 models are computed from the weights exactly as saved (reloaded and
upcast to float32).

Usage:
  python3 scripts/reference/gen_tiny_reference.py --out tests/fixtures/tiny
"""

import os
import sys

# peft serialises target_modules from a Python set, whose iteration order
# depends on the string hash seed. Pin it so reruns write identical files.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

# CPU only, even on a GPU machine.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import glob
import json
import math
import platform
import shutil
import warnings
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
import peft
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from peft import LoraConfig, PeftModel, get_peft_model

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*Could not find a config file.*")

torch.set_default_dtype(torch.float32)
torch.set_num_threads(1)
torch.set_float32_matmul_precision("highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.use_deterministic_algorithms(True)

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS_ID = 0
EOS_IDS = [2, 0]
MAX_POS = 256
GREEDY_STEPS = 16
ATTN_IMPL = "eager"

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

CORPUS = [
    """The quick brown fox jumps over the lazy dog. A small model can still be a
useful test model: it is fast to load, easy to inspect, and the numbers it
produces are deterministic. We use it to check that the engine reads the
weights, applies the rotary embeddings, and computes attention exactly the way
the reference implementation does.""",
    """Once upon a time there was a little server that answered questions. Every
morning it loaded the base model, then it loaded many small adapters, one for
each user. When a request arrived, the server picked the right adapter and
wrote the answer one token at a time. The users were happy, and the server was
happy too, because the adapters were small and the base model was shared.""",
    """In 1969, 3 astronauts flew 384,400 km to the Moon. The trip took about 76
hours. Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024 and
65536 appear often in computer programs. Prices: $3.50, $12.99, 7% off!
Dates: 2024-01-15, 12/31/1999. Time: 09:30, 23:59:59.""",
    """Hello, world! How are you today? I'm fine, thanks. Isn't it nice? Yes --
it is; (mostly) "quoted" text, 'single quotes', [brackets], {braces}, <angle>,
a/b, a\\b, a|b, a&b, a*b, a+b=c, x^2, 50%, #tag, @user, ~tilde, `code`.""",
    """def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

fn main() {
    let x: u32 = 42;
    println!("x = {}", x);
}

if (x > 0 && y < 10) { return x; } else { return -1; }""",
    """The adapter is a low rank update to a linear layer. The weight W is frozen
and the update is B times A, scaled by alpha over r. With rank r the adapter
adds r times (in plus out) parameters. Many adapters can share one base model,
and a batch can mix requests for different adapters in a single forward pass.""",
    """A chat has turns. The system says: you are a tiny test model. The user
asks a question, and the assistant answers it. What is 2 + 2? It is 4. And
3 + 3? It is 6. The user says thanks, and the assistant says you are welcome.""",
    # ChatML-formatted turns, so that role names become single tokens.
    "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    "<|im_start|>user\nThanks!<|im_end|>\n"
    "<|im_start|>assistant\nYou are welcome.<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nSay hello.<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n",
]

# SmolLM2-style ChatML template with a default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def build_tokenizer(tok_dir: Path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_POS,
        chat_template=CHAT_TEMPLATE,
    )
    tok_dir.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json
    # (newer transformers would otherwise write chat_template.jinja).
    try:
        hf_tok.save_pretrained(str(tok_dir), save_jinja_files=False)
    except TypeError:
        hf_tok.save_pretrained(str(tok_dir))
    for extra in ["chat_template.jinja", "special_tokens_map.json", "added_tokens.json"]:
        p = tok_dir / extra
        if p.exists():
            p.unlink()

    # Make sure tokenizer_config.json carries the keys the engine relies on.
    # transformers 5 omits added_tokens_decoder / add_bos_token for tokenizers-backed
    # tokenizers; add them in the form transformers 4 writes (and hub models carry).
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = False
    cfg["bos_token"] = None
    cfg["eos_token"] = "<|im_end|>"
    cfg["pad_token"] = "<|endoftext|>"
    cfg["model_max_length"] = MAX_POS
    cfg["chat_template"] = CHAT_TEMPLATE
    if "added_tokens_decoder" not in cfg:
        cfg["added_tokens_decoder"] = {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in enumerate(SPECIAL_TOKENS)
        }
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=list(EOS_IDS)).save_pretrained(str(tok_dir))
    gen = json.loads((tok_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] == BOS_ID and gen["eos_token_id"] == EOS_IDS, gen

    # Reload through AutoTokenizer and cross-check against the raw tokenizer.
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert auto.eos_token_id == 2 and auto.pad_token_id == 0 and auto.bos_token is None, (
        auto.eos_token_id,
        auto.pad_token_id,
        auto.bos_token,
    )
    assert len(auto) == VOCAB_SIZE, len(auto)
    for text in CORPUS[:3]:
        a = auto(text, add_special_tokens=False)["input_ids"]
        b = raw.encode(text, add_special_tokens=False).ids
        assert a == b
        assert auto(text)["input_ids"] == a, "tokenizer adds special tokens by default"
    return auto, raw


def encode(auto, text):
    return list(auto(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 and theta 5e5 the rotary wavelengths are
    # 6.3, 32.5, 167, 865, ... ; with 64 the first is kept (< 64/4), the second
    # is interpolated (between 16 and 64) and the rest are divided by 8.
    "original_max_position_embeddings": 64,
}


def make_config(cls, rope_theta, rope_scaling=None, **kw):
    """Build a config the way the installed transformers wants rope settings."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=160,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=MAX_POS,
        initializer_range=0.2,
        bos_token_id=BOS_ID,
        eos_token_id=list(EOS_IDS),
        hidden_act="silu",
        attention_dropout=0.0,
        use_cache=True,
    )
    common.update(kw)
    rope_params = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling is not None:
        rope_params = dict(rope_scaling)
        rope_params["rope_theta"] = float(rope_theta)
    cfg = cls(**common, rope_parameters=rope_params)
    rp = getattr(cfg, "rope_parameters", None)
    if not isinstance(rp, dict) or rp.get("rope_theta") != float(rope_theta):
        # Older transformers (4.x): rope_theta + rope_scaling.
        legacy = dict(common, rope_theta=float(rope_theta))
        if rope_scaling is not None:
            legacy["rope_scaling"] = dict(rope_scaling)
        cfg = cls(**legacy)
    return cfg


def randomize_(model, seed):
    """Overwrite every parameter with seeded random values (independent of HF init)."""
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name:
                assert p.dim() == 1, name
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)


def save_model(model, out_dir: Path, dtype, tok_dir: Path, max_shard_size=None):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model = model.to(dtype)
    kw = {"safe_serialization": True}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    try:
        model.save_pretrained(str(out_dir), **kw)
    except TypeError:
        kw.pop("safe_serialization")
        model.save_pretrained(str(out_dir), **kw)
    for f in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / f, out_dir / f)


def load_f32(model_dir: Path):
    m = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation=ATTN_IMPL
    )
    m.eval()
    for p in m.parameters():
        assert p.dtype == torch.float32
    return m


def llama3_inv_freq(theta, dim, factor, low, high, orig):
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    low_wl = orig / low
    high_wl = orig / high
    out, kinds = [], []
    for f in inv.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
            kinds.append("kept")
        elif wl > low_wl:
            out.append(f / factor)
            kinds.append("scaled")
        else:
            s = (orig / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
            kinds.append("interpolated")
    return inv, torch.tensor(out), kinds


def check_rope(model, theta, scaling):
    inv = model.model.rotary_emb.inv_freq.detach().float().cpu()
    dim = 16
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        assert torch.allclose(inv, plain, rtol=1e-6, atol=0), (inv, plain)
        return None
    _, mine, kinds = llama3_inv_freq(
        theta,
        dim,
        scaling["factor"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
        scaling["original_max_position_embeddings"],
    )
    assert torch.allclose(inv, mine, rtol=1e-5, atol=0), (inv, mine)
    assert not torch.allclose(inv, plain, rtol=1e-3, atol=0), "llama3 scaling had no effect"
    assert {"kept", "scaled", "interpolated"} <= set(kinds), kinds
    print(f"  llama3 inv_freq kinds: {kinds}")
    print(f"  unscaled inv_freq: {[f'{x:.3e}' for x in plain.tolist()]}")
    print(f"  scaled   inv_freq: {[f'{x:.3e}' for x in inv.tolist()]}")
    return kinds


# ---------------------------------------------------------------------------
# Reference computations
# ---------------------------------------------------------------------------


@torch.no_grad()
def logprobs_of(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
    return torch.log_softmax(logits, dim=-1).contiguous()


@torch.no_grad()
def greedy_of(model, ids, steps=GREEDY_STEPS):
    seq = list(ids)
    toks, margins = [], []
    for _ in range(steps):
        x = torch.tensor([seq], dtype=torch.long)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
        top = torch.topk(logits, 2)
        t = int(top.indices[0])
        toks.append(t)
        margins.append(float(top.values[0] - top.values[1]))
        seq.append(t)
    return torch.tensor(toks, dtype=torch.int64), torch.tensor(margins, dtype=torch.float32)


# ---------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------

ADAPTERS = {
    # name: (LoraConfig kwargs, init scale c, seed)
    "qv_r2": (dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), 0.09, 1001),
    "mlp_r8_rslora": (
        dict(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=r".*\.mlp\.(gate_proj|up_proj|down_proj)",
        ),
        0.04,
        1002,
    ),
    "all_r16": (dict(r=16, lora_alpha=8, target_modules="all-linear"), 0.04, 1003),
    "attn_r4": (
        dict(r=4, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        0.03,
        1004,
    ),
}
MIN_DELTA, MAX_DELTA = 0.05, 1.0


def make_adapter(base_dir: Path, out_dir: Path, name):
    kw, c, seed = ADAPTERS[name]
    base = load_f32(base_dir)
    cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw)
    pm = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for pname, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(c * torch.randn(p.shape, generator=gen, dtype=torch.float32))
                n += 1
    assert n > 0
    # Keep the saved config machine independent (no absolute paths).
    pm.peft_config["default"].base_model_name_or_path = "llama"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pm.save_pretrained(str(out_dir))
    readme = out_dir / "README.md"
    if readme.exists():
        readme.unlink()
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    with safetensors.safe_open(str(out_dir / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    return saved, keys


def load_peft_single(base_dir: Path, adapter_dir: Path):
    base = load_f32(base_dir)
    pm = PeftModel.from_pretrained(base, str(adapter_dir))
    pm.eval()
    return pm


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------

PROMPT_TEXTS = [
    "The fox.",
    "Once upon a time",
    "def add(a, b):\n    return a + b",
    "The adapter is a low rank update to a linear layer.",
    "Hello, world! How are you today? Fine, thanks.",
]

CHAT_MESSAGES = [
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Thanks!"},
]

TOKENIZATION_SAMPLES = [
    "café ünïcode 日本",
    "12345 + 678 = 13023",
    "a  b   c\n\n\nd\t\te   \n  f",
    "fn main() {\n    let x: u32 = 42;\n}",
    "  leading spaces and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "emoji 🙂 and ünïcödé — dash",
]

MIXED_ADAPTERS = ["__base__", "qv_r2", "mlp_r8_rslora", "all_r16", "attn_r4", "qv_r2"]


def render_chat(auto):
    rendered = auto.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert isinstance(rendered, str)
    expected = "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
    for m in CHAT_MESSAGES:
        expected += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    expected += "<|im_start|>assistant\n"
    assert rendered == expected, repr(rendered)
    ids = encode(auto, rendered)
    tok_ids = auto.apply_chat_template(CHAT_MESSAGES, tokenize=True, add_generation_prompt=True)
    if isinstance(tok_ids, dict) or hasattr(tok_ids, "keys"):
        tok_ids = tok_ids["input_ids"]
    if tok_ids and isinstance(tok_ids[0], list):
        tok_ids = tok_ids[0]
    assert list(tok_ids) == ids, (tok_ids, ids)
    # one system turn is prepended, plus the generation prompt
    assert ids.count(1) == len(CHAT_MESSAGES) + 2 and ids.count(2) == len(CHAT_MESSAGES) + 1, ids
    return rendered, ids


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def repo_root():
    return Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output dir (default: <repo>/tests/fixtures/tiny)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else repo_root() / "tests" / "fixtures" / "tiny"
    out.mkdir(parents=True, exist_ok=True)
    print(f"output: {out.resolve()}")
    print(
        f"python {platform.python_version()} torch {torch.__version__} transformers {transformers.__version__} "
        f"peft {peft.__version__} tokenizers {tokenizers.__version__}"
    )

    # ---- tokenizer
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    auto, raw = build_tokenizer(tok_dir)
    print("tokenizer_config.json:\n" + (tok_dir / "tokenizer_config.json").read_text())

    prompts = [encode(auto, t) for t in PROMPT_TEXTS]
    chat_rendered, chat_ids = render_chat(auto)
    prompts.append(chat_ids)
    prompt_texts = PROMPT_TEXTS + [chat_rendered]
    print("prompt lengths:", [len(p) for p in prompts])

    tokenization = []
    for s in TOKENIZATION_SAMPLES:
        ids = encode(auto, s)
        assert ids == raw.encode(s, add_special_tokens=False).ids
        dec = auto.decode(ids, skip_special_tokens=False)
        assert dec == raw.decode(ids, skip_special_tokens=False)
        tokenization.append({"text": s, "ids": ids, "decoded": dec})
    for t, ids in zip(prompt_texts, prompts):
        assert auto.decode(ids, skip_special_tokens=False) == t

    # ---- base models
    specs = [
        (
            "llama",
            LlamaForCausalLM,
            make_config(
                LlamaConfig,
                10000.0,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            ),
            torch.float32,
            None,
            11,
            None,
        ),
        (
            "llama31",
            LlamaForCausalLM,
            make_config(
                LlamaConfig,
                500000.0,
                rope_scaling=LLAMA31_ROPE,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            ),
            torch.bfloat16,
            "100KB",
            12,
            LLAMA31_ROPE,
        ),
        (
            "mistral",
            MistralForCausalLM,
            make_config(
                MistralConfig,
                10000.0,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=1,
                sliding_window=None,
                tie_word_embeddings=False,
            ),
            torch.float16,
            None,
            13,
            None,
        ),
        (
            "qwen2",
            Qwen2ForCausalLM,
            make_config(
                Qwen2Config,
                10000.0,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                use_sliding_window=False,
                sliding_window=None,
            ),
            torch.float32,
            None,
            14,
            None,
        ),
    ]

    tensors = {}
    for p, ids in enumerate(prompts):
        tensors[f"prompt.{p}"] = torch.tensor(ids, dtype=torch.int64)

    single_lp = {}
    cases = []
    min_margin = {}
    rope_kinds = None

    def run_case(case, model):
        cases.append(case)
        mm = float("inf")
        for p, ids in enumerate(prompts):
            lp = logprobs_of(model, ids)
            assert lp.shape == (len(ids), VOCAB_SIZE)
            assert torch.isfinite(lp).all()
            tensors[f"logprobs.{case}.{p}"] = lp
            single_lp[(case, p)] = lp
            g, m = greedy_of(model, ids)
            tensors[f"greedy.{case}.{p}"] = g
            tensors[f"margin.{case}.{p}"] = m
            mm = min(mm, float(m.min()))
        min_margin[case] = mm

    configs = {}
    for name, cls, cfg, dtype, shard, seed, rope in specs:
        print(f"== model {name} ({dtype})")
        torch.manual_seed(seed)
        model = cls(cfg)
        if getattr(cfg, "tie_word_embeddings", False):
            assert model.lm_head.weight is model.model.embed_tokens.weight, "embeddings not tied"
        randomize_(model, seed)
        mdir = out / name
        save_model(model, mdir, dtype, tok_dir, max_shard_size=shard)
        del model
        cfg_text = (mdir / "config.json").read_text()
        configs[name] = json.loads(cfg_text)
        print(f"{name}/config.json:\n{cfg_text}")
        if shard is not None:
            shards = sorted(glob.glob(str(mdir / "model-*.safetensors")))
            assert len(shards) >= 2, shards
            assert (mdir / "model.safetensors.index.json").exists()
            assert not (mdir / "model.safetensors").exists()
        else:
            assert (mdir / "model.safetensors").exists()
        # check on-disk dtype
        for f in sorted(glob.glob(str(mdir / "*.safetensors"))):
            with safetensors.safe_open(f, "pt") as fh:
                for k in fh.keys():
                    assert fh.get_slice(k).get_dtype() == {
                        torch.float32: "F32",
                        torch.bfloat16: "BF16",
                        torch.float16: "F16",
                    }[dtype], (f, k)

        m = load_f32(mdir)
        theta = 500000.0 if name == "llama31" else 10000.0
        kinds = check_rope(m, theta, rope)
        if kinds is not None:
            rope_kinds = kinds
        run_case(name, m)
        del m

    # ---- adapters
    adir = out / "adapters"
    if adir.exists():
        shutil.rmtree(adir)
    adapter_cfgs = {}
    adapter_delta = {}
    base_dir = out / "llama"
    for name in ADAPTERS:
        print(f"== adapter {name}")
        saved, keys = make_adapter(base_dir, adir / name, name)
        adapter_cfgs[name] = saved
        print(f"  adapter_config.json target_modules: {saved['target_modules']!r}")
        print(f"  {len(keys)} tensors, e.g. {keys[0]}")
        pm = load_peft_single(base_dir, adir / name)
        case = f"llama+{name}"
        run_case(case, pm)
        del pm
        d = [
            (single_lp[(case, p)] - single_lp[("llama", p)]).abs().mean().item()
            for p in range(len(prompts))
        ]
        adapter_delta[name] = float(np.mean(d))
        print(f"  mean |d logprob| vs base: {adapter_delta[name]:.4f}")
        assert MIN_DELTA <= adapter_delta[name] <= MAX_DELTA, (name, adapter_delta[name])

    # target_modules forms as written by peft
    tm = {k: v["target_modules"] for k, v in adapter_cfgs.items()}
    assert sorted(tm["qv_r2"]) == ["q_proj", "v_proj"], tm
    assert tm["mlp_r8_rslora"] == r".*\.mlp\.(gate_proj|up_proj|down_proj)", tm
    assert adapter_cfgs["mlp_r8_rslora"]["use_rslora"] is True
    assert sorted(tm["attn_r4"]) == ["k_proj", "o_proj", "q_proj", "v_proj"], tm
    if isinstance(tm["all_r16"], list):
        assert "lm_head" not in tm["all_r16"], tm

    # ---- mixed batch: one forward, right padded
    print("== mixed batch")
    base = load_f32(base_dir)
    names = list(ADAPTERS)
    pm = PeftModel.from_pretrained(base, str(adir / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adir / n), adapter_name=n)
    pm.eval()
    assert len(MIXED_ADAPTERS) == len(prompts)
    lens = [len(p) for p in prompts]
    T = max(lens)
    ids = torch.zeros((len(prompts), T), dtype=torch.long)  # pad = <|endoftext|> = 0
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask, adapter_names=list(MIXED_ADAPTERS)).logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    mixed_rows = []
    mixed_max_diff = 0.0
    for i, a in enumerate(MIXED_ADAPTERS):
        row = lp[i, : lens[i]].contiguous().clone()
        tensors[f"mixed.{i}"] = row
        ref_case = "llama" if a == "__base__" else f"llama+{a}"
        diff = (row - single_lp[(ref_case, i)]).abs().max().item()
        mixed_max_diff = max(mixed_max_diff, diff)
        print(f"  row {i} adapter {a:>14} prompt {i} len {lens[i]:2d}: max |diff| vs single = {diff:.3e}")
        assert diff <= 1e-5, (i, a, diff)
        mixed_rows.append({"adapter": None if a == "__base__" else a, "prompt": i})
    del pm, base

    # ---- write outputs
    for k, v in tensors.items():
        assert v.is_contiguous(), k
        assert v.dtype in (torch.int64, torch.float32), (k, v.dtype)
    ref_path = out / "reference.safetensors"
    safetensors.torch.save_file(dict(sorted(tensors.items())), str(ref_path), metadata={"format": "pt"})

    meta = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
        },
        "vocab_size": VOCAB_SIZE,
        "special_tokens": {s: i for i, s in enumerate(SPECIAL_TOKENS)},
        "greedy_steps": GREEDY_STEPS,
        "prompts": [{"text": t, "ids": ids} for t, ids in zip(prompt_texts, prompts)],
        "cases": cases,
        "models": {
            name: {"dir": name, "saved_dtype": str(dtype).replace("torch.", ""), "sharded": shard is not None}
            for name, _, _, dtype, shard, _, _ in specs
        },
        "adapters": {
            name: {
                "dir": f"adapters/{name}",
                "base": "llama",
                "init_scale": ADAPTERS[name][1],
                "requested_target_modules": ADAPTERS[name][0]["target_modules"],
                "saved_target_modules": adapter_cfgs[name]["target_modules"],
            }
            for name in ADAPTERS
        },
        "llama31_inv_freq_kinds": rope_kinds,
        "mixed_adapter_names": MIXED_ADAPTERS,
        "mixed_rows": mixed_rows,
        "mixed_vs_single_max_abs_diff": mixed_max_diff,
        "chat": {"messages": CHAT_MESSAGES, "rendered": chat_rendered, "ids": chat_ids},
        "tokenization": tokenization,
        "min_greedy_margin": min_margin,
        "adapter_delta": adapter_delta,
        "adapter_delta_definition": "mean over prompts of mean over (position, vocab) of |logprob(adapter) - logprob(base)|",
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    # ---- summary
    print("\n== summary")
    print("cases:", ", ".join(cases))
    print("min greedy margin:")
    for k, v in min_margin.items():
        print(f"  {k:24s} {v:.4f}")
    print(f"mixed vs single max |diff|: {mixed_max_diff:.3e}")
    print("adapter delta (mean |d logprob|):")
    for k, v in adapter_delta.items():
        print(f"  {k:16s} {v:.4f}")
    print("files:")
    total = 0
    for f in sorted(out.rglob("*")):
        if f.is_file():
            sz = f.stat().st_size
            total += sz
            print(f"  {sz:9d}  {f.relative_to(out)}")
    print(f"  {total:9d}  TOTAL ({total / 1e6:.3f} MB)")
    assert total < 4_000_000, f"fixtures too large: {total} bytes"


if __name__ == "__main__":
    main()
