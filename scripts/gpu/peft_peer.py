#!/usr/bin/env python3
"""The peer for scripts/gpu/run.sh bench: Hugging Face transformers + PEFT on the same
Llama-3.1-8B shape with random bf16 weights, on the same GPU in the same call.

Decode step time of eager `generate` with 128-token prompts: the base model at batch 1 and 64,
and PEFT mixed-adapter batches (`adapter_names`) with 64 distinct rank-16 adapters on all seven
targets at batch 64. A step is (time of N+1 new tokens - time of 1) / N.
"""
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
config = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
torch.manual_seed(0)
t0 = time.time()
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.eval()
print(f"model ready in {time.time() - t0:.1f}s", flush=True)


def step_ms(m, bs, new=4, **kw):
    ids = torch.randint(0, config.vocab_size, (bs, 128), device="cuda")
    mask = torch.ones_like(ids)

    def gen(n):
        torch.cuda.synchronize()
        t = time.time()
        with torch.no_grad():
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, **kw)
        torch.cuda.synchronize()
        return time.time() - t

    gen(2)  # warm-up
    return (gen(new + 1) - gen(1)) / new * 1e3


rows = []
for bs in (1, 64):
    ms = step_ms(model, bs)
    rows.append((f"HF transformers base bs={bs}", ms, bs * 1e3 / ms))
    print(rows[-1], flush=True)

t0 = time.time()
cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
peft = get_peft_model(model, cfg, adapter_name="a0")
for i in range(1, 64):
    peft.add_adapter(f"a{i}", cfg)
peft.to(torch.bfloat16)
peft.eval()  # adapter_names needs eval mode
print(f"64 adapters added in {time.time() - t0:.1f}s", flush=True)
names = [f"a{i}" for i in range(64)]
ms = step_ms(peft, 64, new=2, adapter_names=names)
rows.append(("PEFT mixed batch bs=64, 64 distinct r16", ms, 64 * 1e3 / ms))
print(rows[-1], flush=True)
print("\n| peer | ms/step | tok/s |\n|---|---|---|")
for name, ms, tps in rows:
    print(f"| {name} | {ms:.1f} | {tps:.1f} |")
