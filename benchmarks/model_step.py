"""Training-step speed and memory: our DiT vs diffusers' WanTransformer3DModel at a matched config.

    python benchmarks/model_step.py [--repeats 5] [--frames 5 20] [--precisions fp32 bf16] [--compile]

Matched config (issue 3): hidden 384, 6 layers, 6 heads (head_dim 64), FFN 1536, patch (1, 2, 2),
16 latent channels, 64 text tokens of a 4096-d (T5-sized) encoder, batch 1, latents 5x32x32
(1280 tokens) and 4x the frames, 20x32x32 (5120 tokens). Both models are the same design
(Wan-style: adaLN-single modulation, QK RMSNorm, 3D RoPE, ungated cross-attention with an affine
LayerNorm, GELU(tanh) MLP), so the difference is implementation overhead, not architecture.

A step is forward + MSE loss + backward + AdamW (fused, the same for both), in fp32 or under
bf16 autocast. Method:
- time: one process, one thread (2-thread timings swing ~2x on this shared machine, 1-thread ones
  hold within a few percent), one warm-up step each, then ours and diffusers alternate
  `--repeats` times; medians and the median of the paired ratios are reported, with the range of
  the paired ratios ("ratio range") so a reader can tell a real difference from machine noise.
- `--compile`: every transformer block of BOTH models is torch.compile'd in place first (what
  `strategy.parallel.compile=true` does to ours), and the warm-up steps include the compile. Eager is the
  default: it is what the two implementations' own code costs.
- GEMM rate: a 2048^3 matmul in the same dtype, timed between rounds in the same process (median);
  "% GEMM" = our model FLOPs per second (dit_video.model.flops, training = fwd + bwd, matmuls and
  attention products, recompute excluded) / that rate.
- "bound": the % GEMM a step would reach if every matmul ran at the GEMM rate, self- and
  cross-attention ran at the rate CPU SDPA reaches (fwd + bwd at the model's own [1, heads,
  tokens, head_dim] shape, timed in the same run, "SDPA GF/s") and everything else took no time:
  training FLOPs / (matmul FLOPs / GEMM rate + attention FLOPs / SDPA rate) / GEMM rate. Attention
  FLOPs grow with tokens^2, so at 1280-5120 tokens this caps % GEMM well below 100%.
- "floor": the time ratio ours/diffusers if everything in our step but attention took no time:
  attention FLOPs / SDPA rate / diffusers' step time. Both models call the same SDPA kernel, so no
  rewrite of the code around it can take the time ratio below this.
- peak memory: each (model, precision, size) runs in a FRESH subprocess (so one variant's freed
  but cached heap cannot hide another's), with glibc told to serve blocks >= 64 KiB by mmap
  (MALLOC_MMAP_THRESHOLD_=65536) so freed tensors go back to the OS and RSS tracks live memory.
  peak = VmHWM (kernel's peak resident set) after two training steps minus VmRSS just before the
  model is built: weights + gradients + AdamW state + the activation peak. torch has no CPU
  allocator statistics, and tracemalloc does not see torch's allocations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_video.model import DiT, DiTConfig  # noqa: E402
from dit_video.model.flops import dit_flops  # noqa: E402

HIDDEN, LAYERS, HEADS, FFN, CHANNELS, TEXT_DIM, TEXT_LEN, HW = 384, 6, 6, 1536, 16, 4096, 64, 32


def ours_config() -> DiTConfig:
    return DiTConfig(
        in_channels=CHANNELS, text_dim=TEXT_DIM, hidden_size=HIDDEN, depth=LAYERS, num_heads=HEADS,
        mlp_ratio=FFN / HIDDEN, patch_size=(1, 2, 2),
    )


def build(which: str, compile_blocks: bool = False):
    """(model, step_inputs_fn): the model and a function mapping (x, t, text) to its output."""
    model, call = _build(which)
    if compile_blocks:
        for block in model.blocks:  # both models keep their blocks in a ModuleList named `blocks`
            block.compile()  # in place, as dit_video.parallel.parallelize does
    return model, call


def _build(which: str):
    torch.manual_seed(0)
    if which == "ours":
        model = DiT(ours_config())
        with torch.no_grad():  # no all-zero (adaLN-Zero) weights: time a model mid-training
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
        return model, lambda m, x, t, text: m(x, t, text)
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS,
        in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=FFN,
        num_layers=LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    # diffusers takes the timestep on the 0..1000 scale; ours takes t in [0, 1].
    return model, lambda m, x, t, text: m(x, t * 1000, text, return_dict=False)[0]


def make_inputs(frames: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, CHANNELS, frames, HW, HW, generator=gen)
    t = torch.rand(1, generator=gen)
    text = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen)
    target = torch.randn(1, CHANNELS, frames, HW, HW, generator=gen)
    return x, t, text, target


def make_step(which: str, frames: int, precision: str, compile_blocks: bool = False):
    model, call = build(which, compile_blocks)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, t, text, target = make_inputs(frames)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = call(model, x, t, text)
            loss = (out.float() - target).pow(2).mean()
        loss.backward()
        opt.step()

    return step


def gemm_rate(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of one n^3 matmul in `dtype` (best of 3 after a warm-up)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):  # the first bf16 call also sets up the AMX tiles (and the clock ramps up)
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sdpa_rate(dtype: torch.dtype, tokens: int) -> float:
    """FLOP/s of CPU SDPA forward + backward at [1, HEADS, tokens, HIDDEN/HEADS] (best of 2 after a warm-up)."""
    q, k, v = (torch.randn(1, HEADS, tokens, HIDDEN // HEADS, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, HEADS, tokens, HIDDEN // HEADS, dtype=dtype)

    def run() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

    run()
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    # forward: q k^T and probs v, 2 * tokens^2 * HIDDEN each; backward twice that (no recompute counted)
    return 3 * 4 * tokens**2 * HIDDEN / best


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(which: str, frames: int, precision: str, compile_blocks: bool) -> None:
    """Runs in a fresh process: print the peak RSS growth (MiB) of two training steps as JSON."""
    torch.set_num_threads(1)
    if which == "diffusers":
        import diffusers  # noqa: F401  (import cost is not the model's memory)
    make_inputs(frames)
    base = _rss_kib("VmRSS")
    step = make_step(which, frames, precision, compile_blocks)
    step()
    step()
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - base) / 1024}))


def measure_memory(which: str, frames: int, precision: str, compile_blocks: bool) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", which, str(frames), precision]
        + (["--compile"] if compile_blocks else []),
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="A/B rounds per (precision, size)")
    parser.add_argument("--frames", type=int, nargs="+", default=[5, 20], help="latent frames (1x and 4x)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block of both models first")
    parser.add_argument("--memory-child", nargs=3, metavar=("WHICH", "FRAMES", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        which, frames, precision = args.memory_child
        memory_child(which, int(frames), precision, args.compile)
        return

    torch.set_num_threads(1)
    import diffusers

    mode = "blocks torch.compile'd" if args.compile else "eager"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, 1 thread, batch 1, {args.repeats} A/B rounds, {mode}")
    # The targets assume AVX512-BF16 without AMX (bf16 GEMM ~4.5x fp32); with AMX tiles the
    # bf16 GEMM is several times faster again, and "% GEMM" is measured against that rate.
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    fp32_rate, bf16_rate = gemm_rate(torch.float32), gemm_rate(torch.bfloat16)
    print(f"GEMM 2048^3: fp32 {fp32_rate / 1e9:.0f} GF/s, bf16 {bf16_rate / 1e9:.0f} GF/s "
          f"({bf16_rate / fp32_rate:.1f}x; AMX bf16 {'yes' if amx else 'no'})")
    cfg = ours_config()
    rows = []
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for frames in args.frames:
            count = dit_flops(cfg, (frames, HW, HW), TEXT_LEN)
            flops = count.training
            attn_flops = 3 * count.attention  # fwd + bwd (2x fwd) of the attention products
            ours = make_step("ours", frames, precision, args.compile)
            theirs = make_step("diffusers", frames, precision, args.compile)
            ours()
            theirs()
            t_ours, t_theirs, rates = [], [], []
            for _ in range(args.repeats):
                rates.append(gemm_rate(dtype))
                for fn, times in ((ours, t_ours), (theirs, t_theirs)):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
            del ours, theirs
            ratios = [a / b for a, b in zip(t_ours, t_theirs, strict=True)]
            ratio = statistics.median(ratios)
            if args.no_memory:
                mem_ours = mem_theirs = float("nan")
            else:
                mem_ours, mem_theirs = (measure_memory(w, frames, precision, args.compile) for w in ("ours", "diffusers"))
            rate = statistics.median(rates)
            achieved = flops / statistics.median(t_ours)
            attn_rate = sdpa_rate(dtype, frames * (HW // 2) ** 2)
            bound = flops / ((flops - attn_flops) / rate + attn_flops / attn_rate) / rate
            floor = attn_flops / attn_rate / statistics.median(t_theirs)
            rows.append(
                (precision, frames, statistics.median(t_ours), statistics.median(t_theirs), ratio,
                 f"{min(ratios):.2f}-{max(ratios):.2f}", mem_ours, mem_theirs, mem_ours / mem_theirs,
                 achieved / 1e9, rate / 1e9, achieved / rate, attn_rate / 1e9, bound, floor)
            )
            print(f"  done {precision} {frames} frames", file=sys.stderr, flush=True)

    header = (
        f"{'prec':>5} {'frames':>6} {'tokens':>6} {'ours s':>8} {'diff s':>8} {'time ratio':>10} {'ratio range':>11} "
        f"{'ours MiB':>9} {'diff MiB':>9} {'mem ratio':>9} {'GFLOP/s':>8} {'GEMM GF/s':>9} {'% GEMM':>7} "
        f"{'SDPA GF/s':>9} {'bound':>6} {'floor':>6}"
    )
    print(header)
    for p, f, to, td, r, spread, mo, md, mr, ach, rate, frac, attn_rate, bound, floor in rows:
        tokens = f * (HW // 2) ** 2
        print(
            f"{p:>5} {f:>6} {tokens:>6} {to:8.3f} {td:8.3f} {r:10.3f} {spread:>11} {mo:9.0f} {md:9.0f} {mr:9.3f} "
            f"{ach:8.1f} {rate:9.1f} {100 * frac:6.1f}% {attn_rate:9.1f} {100 * bound:5.1f}% {floor:6.3f}"
        )
    bf16_ratios = [r[4] for r in rows if r[0] == "bf16"]
    if bf16_ratios:
        # The headline: the geometric mean over sizes of the bf16 time ratio.
        geo = statistics.geometric_mean(bf16_ratios)
        print(f"time ratio bf16 {geo:.3f}")


if __name__ == "__main__":
    main()
