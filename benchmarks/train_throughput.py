"""Training throughput of the Transformer and its short-conv variants, side by side in one run.

    PYTHONPATH=. python benchmarks/train_throughput.py [--config 300M|small|both|tiny]
        [--variants transformer,static-qkv,...] [--batch-size N] [--seq-len T] [--steps N]
        [--warmup N] [--rounds N] [--compile model|graphs|blocks|none] [--no-compile]
        [--device cuda|cpu] [--fused-ce off|on|both] [--out FILE.json|FILE.csv]

Each step is a whole training step as the trainer runs it: forward and backward under bf16 autocast
(CUDA), gradient clipping, a fused AdamW step and zero_grad, on a fixed batch of random tokens that
already sits on the device (the trainer's pinned, asynchronous loading is not what is measured). No
value is read back inside the loop, so the host never waits for the device between steps.

Per config, every variant is built, compiled and warmed up first; then the timed steps run in
`--rounds` interleaved rounds (each round times every variant for steps / rounds steps), so drifts
of clock or temperature hit all variants alike and the slowdowns are ratios measured side by side.
Columns: tok/s over all timed steps; MFU = analytic training FLOPs per token
(`counting.flops_per_token(cfg, seq_len).train`) x tok/s / the bf16 matmul rate measured in the same
run (8192^3, mean of 10 after warm-up); peak GiB = the most memory the variant allocated during its
warm-up steps (its parameters, gradients, optimiser state and activations), above what was allocated
before it was built; slowdown = the Transformer's tok/s over the variant's, minus one; +FLOPs = the
variant's analytic training FLOPs per token over the Transformer's, minus one: the part of the
slowdown that its extra arithmetic explains at equal MFU (for dynamic-headwise-qkv most of it is
the filter generator's projection, D -> W * H per conv, which no conv kernel can remove).

Compilation (`--compile`): `model` (default) compiles the whole model as the trainer does
(train.compile: true), so the table is what training runs; `graphs` also captures its steps in
CUDA graphs (torch.compile mode "reduce-overhead", as train.compile: graphs); `blocks` compiles
each block and the output head (`lm.compile_regions`): each variant compiles one block instead of
every layer, ~3x faster to set up, and within a point of `model` at 300M since the RoPE tables
(KERNELS.md, training point 34); `none` runs eagerly. Shapes are static (dynamic=False).

Fused cross-entropy (`--fused-ce`, models/fused_ce.py): the training step asks the model for its
loss only (return_logits=False, as the trainer's step), and the switch decides whether that loss
comes from chunked linear_cross_entropy ("on") or from the whole batch's logits ("off"). Left out,
the ISOFLOP_FUSED_CE environment variable decides (default auto: off). `both` builds every variant
twice, without and with it, timed in the same interleaved rounds; the table then shows each pair
and the fused path's tok/s gain and peak-memory change ("fused gain"). Slowdowns compare variants
at the same setting.

The last lines check issue 9's targets against the 300M rows (benchmarks/targets.py): the
transformer's MFU and each conv variant's slowdown.

Configs: 300M is the paper's reference (d1024-l16, vocab 100,352, seq 4096, 8 x 4096 tokens a step);
small is the 150M size of the ladder (d768-l12) at the same context and batch; tiny is a CPU-sized
smoke run (and the default off CUDA).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from isoflop.models.config import ModelConfig
from isoflop.models.counting import count_params, flops_per_token
from isoflop.models.fused_ce import get_fused_ce, set_fused_ce
from isoflop.models.lm import build_model, compile_regions
from isoflop.models.registry import architecture_names, make_model_config
from isoflop.models.sizes import PAPER_VOCAB_SIZE, resolve_size
from targets import Check, print_checks  # benchmarks/targets.py: the script's directory is on the path

DEFAULT_VARIANTS = ("transformer", "static-qkv", "dynamic-qkv", "dynamic-headwise-qkv", "dynamic-all-linear")
BASELINE = "transformer"
COMPILE_MODES = ("blocks", "model", "graphs", "none")
FUSED_CE_CHOICES = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}
GRAD_CLIP = 1.0  # the trainer's default (optim.grad_clip); clipping is part of its step
# Issue 9's targets, for the 300M config: the transformer's MFU, and each variant's slowdown against
# it (the "dynamic-qkv" is both the low-rank and the head-wise variant).
TARGET_CONFIG, TARGET_MFU = "300M", 0.40
SLOWDOWN_TARGETS = {"static-qkv": 0.03, "dynamic-qkv": 0.04, "dynamic-headwise-qkv": 0.04,
                    "dynamic-all-linear": 0.12}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    size: str  # a size the ladder resolves (isoflop.models.sizes.resolve_size)
    seq_len: int
    batch_size: int
    vocab_size: int


CONFIGS = {
    "300M": BenchConfig("300M", "300M", seq_len=4096, batch_size=8, vocab_size=PAPER_VOCAB_SIZE),
    "small": BenchConfig("small", "150M", seq_len=4096, batch_size=8, vocab_size=PAPER_VOCAB_SIZE),
    "tiny": BenchConfig("tiny", "tiny", seq_len=64, batch_size=2, vocab_size=256),
}
CONFIG_CHOICES = {"300M": ["300M"], "small": ["small"], "both": ["300M", "small"], "tiny": ["tiny"]}


@dataclass
class Result:
    config: str
    variant: str
    params: int
    seq_len: int
    batch_size: int
    train_flops_per_token: int
    fused_ce: str = "off"  # the fused cross-entropy setting it ran with (auto, off or on)
    setup_s: float = 0.0
    peak_gib: float | None = None
    error: str | None = None  # why the variant could not be built, compiled or stepped
    round_s: list[float] = field(default_factory=list)
    timed_steps: int = 0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    slowdown: float | None = None
    extra_flops: float | None = None  # analytic training FLOPs per token over the baseline's, - 1
    fused_gain: float | None = None  # "on" rows of --fused-ce both: tok/s over the "off" row's, - 1

    @property
    def label(self) -> str:
        return self.variant + (" +fused-ce" if self.fused_ce == "on" else "")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, repeats: int = 10, warmup_s: float = 0.5) -> float:
    """FLOP/s of a large square matmul in the dtype training computes in: bf16 8192^3 on CUDA,
    float32 at a CPU-sized shape elsewhere. The mean over `repeats` after `warmup_s` seconds of
    the same matmul (so an idle GPU has raised its clocks first)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        a @ b
        synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


class VariantRun:
    """One variant's model, optimiser and batch, ready to take training steps."""

    def __init__(self, cfg: ModelConfig, device: torch.device, compile_mode: str, seq_len: int,
                 batch_size: int, fused_ce: str) -> None:
        self.device, self.fused_ce = device, fused_ce
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device: no host-side init, no copy
            self.model = build_model(cfg)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(0.1), lr=1e-4,
                                           fused=device.type == "cuda")
        self.graphs = compile_mode == "graphs" and device.type == "cuda"
        if compile_mode == "blocks":
            self.forward = compile_regions(self.model, dynamic=False)
        elif compile_mode in ("model", "graphs"):
            mode = "reduce-overhead" if self.graphs else None
            self.forward = torch.compile(self.model, dynamic=False, mode=mode)
        else:
            self.forward = self.model
        tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=device)
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda")

    def step(self) -> None:
        set_fused_ce(self.fused_ce)  # process-wide, and runs with either setting take turns
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # as the trainer (train.compile: graphs)
        with self.autocast():
            loss = self.forward(self.x, targets=self.y, return_logits=False)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        """Seconds for `steps` steps; the device is synchronised before and after only."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return time.perf_counter() - start


# Where a step's GPU time goes, by kernel name (first match wins; names are lower-cased). The conv
# group's keys match only at a name's start: Inductor names its fused kernels after the ops they
# fuse ("triton_poi_fused_lowrank_conv_backward_transpose_view_5" is a compiled copy around the
# custom op, not one of its kernels; matched anywhere, they once put 4 ms of copies in "conv").
CONV_GROUP = "conv (isoflop Triton)"
KERNEL_GROUPS = (
    (CONV_GROUP, ("_lowrank_", "_headwise_", "_rows_", "_conv_step_", "_sum_partials_")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "matmul")),
    ("compiled elementwise", ("triton_",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copies and casts", ("copy", "cast", "elementwise", "cat", "fill")),
)


def kernel_group(name: str) -> str:
    name = name.lower()
    return next((group for group, keys in KERNEL_GROUPS
                 if any(name.startswith(k) if group == CONV_GROUP else k in name for k in keys)), "other")


def profile_steps(run: "VariantRun", steps: int = 2) -> dict[str, float]:
    """GPU microseconds per step by kernel name, from torch.profiler over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run.step()
        synchronize(run.device)
    times: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            times[event.key] = times.get(event.key, 0.0) + us / steps
    return times


def print_profiles(profiles: dict[str, dict[str, float]], top: int = 8) -> None:
    """Per variant: GPU ms per step by kernel group, the change against the transformer, and its
    top kernels: where a variant's slowdown goes."""
    grouped = {variant: {} for variant in profiles}
    for variant, times in profiles.items():
        for name, us in times.items():
            group = kernel_group(name)
            grouped[variant][group] = grouped[variant].get(group, 0.0) + us / 1e3
    groups = [g for g, _ in KERNEL_GROUPS] + ["other"]
    print(f"\nGPU ms per step by kernel group (torch.profiler; in brackets: change vs {BASELINE})")
    print(f"{'variant':22s} " + " ".join(f"{g[:14]:>20s}" for g in groups) + f" {'total':>16s}")
    base = grouped.get(BASELINE, {})
    for variant, by_group in grouped.items():
        cells = [f"{by_group.get(g, 0.0):8.2f} ({by_group.get(g, 0.0) - base.get(g, 0.0):+7.2f})"
                 for g in groups]
        total, base_total = sum(by_group.values()), sum(base.values())
        print(f"{variant:22s} " + " ".join(f"{c:>20s}" for c in cells)
              + f" {total:7.2f} ({total - base_total:+6.2f})")
    for variant, times in profiles.items():
        print(f"\n{variant}: top {top} kernels (us per step)")
        for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {us:9.1f}  [{kernel_group(name)}] {name[:110]}")


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_up(
    result: Result, cfg: ModelConfig, args: argparse.Namespace, device: torch.device
) -> VariantRun | None:
    """Build, compile and warm up one variant, recording its setup time and peak memory; None
    (and result.error) if that fails: one variant out of memory or failing to compile must not
    lose the others' numbers."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    try:
        run = VariantRun(cfg, device, args.compile, result.seq_len, result.batch_size,
                         result.fused_ce)
        for _ in range(args.warmup):  # the first step compiles
            run.step()
        synchronize(device)
    except Exception as error:  # reported in the table; the other variants go on
        result.error = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        print(f"  {result.config} {result.label}: FAILED {result.error}", flush=True)
        return None
    result.setup_s = time.perf_counter() - start
    if device.type == "cuda":
        result.peak_gib = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    print(f"  {result.config} {result.label}: built, compiled and warmed up in "
          f"{result.setup_s:.1f} s", flush=True)
    return run


def bench_config(bench: BenchConfig, args: argparse.Namespace, device: torch.device,
                 peak_flops: float) -> list[Result]:
    """Every variant of one config: set up one after the other, then timed in interleaved rounds."""
    seq_len = args.seq_len or bench.seq_len
    batch_size = args.batch_size or bench.batch_size
    shape = resolve_size(bench.size)
    torch._dynamo.reset()  # fresh compile caches: no recompile limits carried across configs
    runs: dict[str, VariantRun] = {}  # by label
    results = []
    for variant in args.variants:
        cfg = make_model_config(variant, shape.d_model, shape.n_layers, shape.n_heads, shape.d_ff,
                                bench.vocab_size, seq_len)
        for fused_ce in args.fused_ce:
            result = Result(config=bench.name, variant=variant, params=count_params(cfg).total,
                            seq_len=seq_len, batch_size=batch_size,
                            train_flops_per_token=flops_per_token(cfg, seq_len).train,
                            fused_ce=fused_ce)
            results.append(result)
            run = set_up(result, cfg, args, device)
            if run is None:
                release_memory(device)
            else:
                runs[result.label] = run
    timed = [r for r in results if r.label in runs]
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for result in timed:
            result.round_s.append(runs[result.label].timed(per_round))
            result.timed_steps += per_round
    if args.profile and device.type == "cuda":
        print_profiles({r.label: profile_steps(runs[r.label]) for r in timed})
    # Equal step counts: ratios of times are those of rates.
    seconds = {(r.variant, r.fused_ce): sum(r.round_s) for r in timed}
    baseline_flops = {r.fused_ce: r.train_flops_per_token for r in results if r.variant == BASELINE}
    for result in timed:
        result.tokens_per_s = result.timed_steps * batch_size * seq_len / sum(result.round_s)
        result.mfu = result.train_flops_per_token * result.tokens_per_s / peak_flops
        baseline_s = seconds.get((BASELINE, result.fused_ce))
        if baseline_s is not None:
            result.slowdown = sum(result.round_s) / baseline_s - 1
            result.extra_flops = result.train_flops_per_token / baseline_flops[result.fused_ce] - 1
        unfused_s = seconds.get((result.variant, "off"))
        if result.fused_ce == "on" and unfused_s is not None:
            result.fused_gain = unfused_s / sum(result.round_s) - 1
    return results


def fused_gain_cell(result: Result, results: list[Result]) -> str:
    """"+x.x% tok/s, -y.y GiB" for an "on" row against its variant's "off" row."""
    if result.fused_gain is None:
        return ""
    unfused = next(r for r in results if (r.config, r.variant, r.fused_ce)
                   == (result.config, result.variant, "off"))
    cell = f"{100 * result.fused_gain:+.1f}% tok/s"
    if result.peak_gib is not None and unfused.peak_gib is not None:
        cell += f", {result.peak_gib - unfused.peak_gib:+.1f} GiB"
    return cell


def print_table(results: list[Result]) -> None:
    width = max(22, *(len(r.label) for r in results))
    pairs = any(r.fused_gain is not None for r in results)
    head = (f"{'config':7s} {'variant':{width}s} {'params':>8s} {'tok/s':>10s} {'MFU':>6s} "
            f"{'peak GiB':>8s} {'slowdown':>9s} {'+FLOPs':>7s} {'setup s':>8s}" + ("  fused gain" if pairs else ""))
    print(head)
    print("-" * len(head))
    for r in results:
        if r.error is not None:
            print(f"{r.config:7s} {r.label:{width}s} {r.params / 1e6:7.1f}M  FAILED {r.error}")
            continue
        peak = f"{r.peak_gib:8.1f}" if r.peak_gib is not None else f"{'-':>8s}"
        slow = f"{100 * r.slowdown:+8.1f}%" if r.slowdown is not None else f"{'-':>9s}"
        flops = f"{100 * r.extra_flops:+6.1f}%" if r.extra_flops is not None else f"{'-':>7s}"
        gain = f"  {fused_gain_cell(r, results)}" if pairs and r.fused_gain is not None else ""
        print(f"{r.config:7s} {r.label:{width}s} {r.params / 1e6:7.1f}M {r.tokens_per_s:10.0f} "
              f"{100 * r.mfu:5.1f}% {peak} {slow} {flops} {r.setup_s:8.1f}{gain}")


def target_checks(results: list[Result]) -> list[Check]:
    """Issue 9's targets against the 300M rows this run measured (none when it ran other configs)."""
    checks = []
    for r in results:
        if r.config != TARGET_CONFIG or r.error is not None:
            continue
        if r.variant == BASELINE:
            checks.append(Check(f"{r.label} MFU", 100 * r.mfu, 100 * TARGET_MFU, "%", at_least=True))
        elif r.variant in SLOWDOWN_TARGETS and r.slowdown is not None:
            checks.append(Check(f"{r.label} slowdown", 100 * r.slowdown, 100 * SLOWDOWN_TARGETS[r.variant], "%"))
    return checks


def write_results(path: Path, results: list[Result], meta: dict) -> None:
    rows = [asdict(r) for r in results]
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "round_s"])
            writer.writeheader()
            writer.writerows({k: v for k, v in row.items() if k != "round_s"} for row in rows)
    else:
        path.write_text(json.dumps({**meta, "results": rows}, indent=1) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIG_CHOICES), default=None,
                        help="default: both on CUDA, tiny elsewhere")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated architecture names (the registry's)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the config's")
    parser.add_argument("--seq-len", type=int, default=None, help="override the config's")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per variant (steps // rounds in each round, at least 1)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="model",
                        help="model: the whole model, as the trainer compiles it (default); graphs: "
                             "also CUDA graphs; blocks: each block apart (faster to set up); none")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="none",
                        help="same as --compile none")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile 2 steps per variant (CUDA only) and print GPU "
                             "time by kernel group and the top kernels")
    parser.add_argument("--fused-ce", choices=list(FUSED_CE_CHOICES), default=None,
                        help="fused cross-entropy: off, on, or both side by side (default: as "
                             "ISOFLOP_FUSED_CE says)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as .json or .csv")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in architecture_names()]
    if unknown or not variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; allowed: "
                     f"{', '.join(architecture_names())}")
    args.variants = variants
    args.fused_ce = FUSED_CE_CHOICES[args.fused_ce] if args.fused_ce else [get_fused_ce()]
    for name in ("batch_size", "seq_len", "steps", "warmup", "rounds"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')}={value}; allowed: an integer >= "
                         f"{0 if name == 'warmup' else 1}")
    if args.out is not None and args.out.suffix not in (".json", ".csv"):
        parser.error(f"--out {args.out}: allowed: a file ending in .json or .csv")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = CONFIG_CHOICES[args.config or ("both" if device.type == "cuda" else "tiny")]
    # One compiled block per variant lives in the same code cache; a variant falling back to eager
    # after too many recompiles would be a silent slowdown, so make it an error instead.
    dynamo = torch._dynamo.config
    if hasattr(dynamo, "recompile_limit"):
        dynamo.recompile_limit = max(dynamo.recompile_limit,
                                     2 * len(args.variants) * len(args.fused_ce))
    if hasattr(dynamo, "fail_on_recompile_limit_hit"):
        dynamo.fail_on_recompile_limit_hit = True
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer: TF32 for what stays fp32
        import isoflop.kernels.ops  # noqa: F401  (the Triton ops, loaded before any tracing)
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    peak_flops = matmul_peak(device)
    print(f"matmul peak {peak_flops / 1e12:.1f} TFLOP/s "
          f"({'bf16 8192^3' if device.type == 'cuda' else 'fp32 512^3'}); compile: {args.compile}",
          flush=True)
    meta = {"device": str(device), "compile": args.compile, "matmul_peak_flops": peak_flops,
            "fused_ce": args.fused_ce,
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    results = []
    started = time.perf_counter()
    for name in configs:
        bench = CONFIGS[name]
        print(f"{name}: {resolve_size(bench.size).name}, seq {args.seq_len or bench.seq_len}, "
              f"batch {args.batch_size or bench.batch_size}", flush=True)
        done = bench_config(bench, args, device, peak_flops)
        release_memory(device)
        results += done
        print_table(done)  # each config's table as soon as it is done
        if args.out is not None:
            write_results(args.out, results, meta)
    print(f"\nall done in {time.perf_counter() - started:.0f} s; MFU against the measured matmul "
          f"peak; slowdown = transformer tok/s / variant tok/s - 1, measured side by side; "
          f"+FLOPs = the variant's analytic training FLOPs per token / the transformer's - 1"
          + ("; fused gain = +fused-ce tok/s / without - 1, and its peak memory change"
             if len(args.fused_ce) > 1 else ""))
    if len(configs) > 1:
        print()
        print_table(results)
    checks = target_checks(results)
    if checks:
        print_checks(checks, meta["device_name"])
    else:
        print(f"\ntargets: set for the {TARGET_CONFIG} config, which this run did not measure")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
