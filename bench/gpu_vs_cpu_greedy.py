"""Where does greedy decoding on GPU (float32) leave the CPU run? For each prompt: the first diverging step, the
top-2 logit margin there on both devices, and the largest logit difference before it. A divergence at a
margin far above the logit differences is a bug; one at a near-tie is rounding.

    python3 bench/gpu_vs_cpu_greedy.py --arch mistral --lengths 1 17 64 163 200 --new 32
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import torch

from engine import EngineConfig, LLMEngine, SamplingParams


def logits_trace(model: pathlib.Path, device: str, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of every step ([new, vocab], float32, CPU)."""
    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", device=device, kv_cache_memory_bytes=32 << 20))
    seen: list[torch.Tensor] = []
    execute = engine.executor.runner.execute

    def recording(inp):  # type: ignore[no-untyped-def]
        out = execute(inp)
        seen.append(out.detach().float().cpu())
        return out

    engine.executor.runner.execute = recording  # type: ignore[method-assign]
    engine.add_request("r", prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.token_ids
    engine.shutdown()
    return tokens, torch.cat([s for s in seen if s.shape[0]], dim=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mistral")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 17, 64, 163, 200])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", action="store_true", help="also compare one batched run per device")
    args = ap.parse_args()
    from tests.model_factory import make_tiny_model, random_prompts

    model = make_tiny_model(pathlib.Path(tempfile.mkdtemp()) / args.arch, args.arch, seed=2)
    if args.batch:
        prompts = [random_prompts(1, [n], 512, seed=n)[0] for n in args.lengths]
        runs = {}
        for device in ("cpu", "cuda"):
            from engine import LLM

            with LLM(model=str(model), dtype="float32", device=device, kv_cache_memory_bytes=32 << 20) as llm:
                outs = llm.generate(prompts, SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True))
                runs[device] = [o.token_ids for o in outs]
        for n, p, c, g in zip(args.lengths, prompts, runs["cpu"], runs["cuda"], strict=True):
            single = logits_trace(model, "cuda", p, args.new)[0]
            print(f"batched prompt {n:4d}: gpu batch == cpu batch {c == g}, gpu batch == gpu single {g == single}, "
                  f"cpu batch == gpu single {c == single}")
    for n in args.lengths:
        prompt = random_prompts(1, [n], 512, seed=n)[0]
        cpu_tokens, cpu_logits = logits_trace(model, "cpu", prompt, args.new)
        gpu_tokens, gpu_logits = logits_trace(model, "cuda", prompt, args.new)
        diverge = next((i for i, (a, b) in enumerate(zip(cpu_tokens, gpu_tokens, strict=True)) if a != b), None)
        upto = diverge if diverge is not None else len(cpu_tokens)
        diff = (cpu_logits[: upto + 1] - gpu_logits[: upto + 1]).abs().max().item()
        line = f"prompt {n:4d}: max |logit diff| {diff:.2e}"
        if diverge is None:
            print(line + f", identical {len(cpu_tokens)} tokens")
            continue
        margins = [float(t.topk(2).values[0] - t.topk(2).values[1]) for t in (cpu_logits[diverge], gpu_logits[diverge])]
        print(line + f", diverges at step {diverge}: top-2 margin cpu {margins[0]:.2e} gpu {margins[1]:.2e}")


if __name__ == "__main__":
    main()
