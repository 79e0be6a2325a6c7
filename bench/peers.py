"""Our GaLore and Fira against the official packages, in one process, on one model.

Installs nothing. With ``pip install -e .[bench]`` (fira==1.0.2, galore-torch==1.0, apollo-torch==1.0.3)
it compares, on a LLaMA model of LLaMA-130M's widths (hidden 768, intermediate 2048, 12 heads,
vocab 32000; ``--layers`` 2 by default) built with ``transformers``, at the same batch, rank
(256) and T (200):

* torch AdamW (foreach, the for-loop that is torch's CPU default, and fused),
* our GaLore and Fira (``fullrank``), also with ``capturable=True``, and our APOLLO (P regenerated from
  its seed in every step, the default, and stored: ``projection_storage="matrix"``),
* ``fira`` FiraAdamW, ``galore-torch`` GaLoreAdamW, ``apollo-torch`` APOLLOAdamW,
* ``pytorch-optimizer``'s GaLore and Fira (4.x; how their updates differ from ours: docs/benchmarks.md).

A package that is not installed is a "not installed" row, not an error.

Measured for each: the optimizer step (median of ``--steps`` steps on fixed gradients, the
optimizers taking turns), the refresh step (projection recomputed: SVD, or a new random matrix for
APOLLO) and its extra cost alone (median over ``--refresh-reps`` of the refresh step minus the
step right after it), the amortised step steady + extra/T, the
end-to-end training step (forward + backward + step, median of ``--e2e-steps``, also amortised), and
the optimizer-state bytes: every tensor reachable from the state, the projector objects that
galore-torch, fira and apollo-torch keep in it included, each storage counted once at full size.

All optimizers step the same model (their states are keyed by the same parameters): the forward
and backward passes are identical for all, and the values the weights drift to do not change the
arithmetic. Learning rate 1e-3, weight decay 0.

    PYTHONPATH=src python bench/peers.py --threads 2       # writes bench/results/peers.json, docs/img/peers_speed.png
    PYTHONPATH=src python bench/peers.py --threads 1 --rows apollo APOLLO --projected-only --out bench/results/peers_apollo_threads1.json
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as tm  # noqa: E402

import fullrank  # noqa: E402
from fullrank.memory import optimizer_state_bytes  # noqa: E402

PEER_PACKAGES = {"fira": "fira", "galore_torch": "galore-torch", "apollo_torch": "apollo-torch",
                 "pytorch_optimizer": "pytorch-optimizer"}
GALORE_SCALE = 0.25  # GaLore/Fira's α for models under 1B (both papers)
APOLLO_SCALE = 1.0   # APOLLO (rank 256, channel-wise) uses scale 1; APOLLO-Mini 128
TARGET_MODULES = ("self_attn", "mlp")


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=args.layers,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=max(args.seq, 1024),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    return model, config


def split(model):
    """(projected [(name, param)], plain [(name, param)]) by fullrank.param_groups' rule."""
    groups = fullrank.param_groups(model, rank=1, target_modules=TARGET_MODULES)
    projected = list(zip(groups[0]["param_names"], groups[0]["params"]))
    plain = list(zip(groups[1]["param_names"], groups[1]["params"])) if len(groups) > 1 else []
    return projected, plain


def make_optimizers(model, args) -> dict:
    """{row name: optimizer | "not installed" | "error: ..."}."""
    projected, plain = split(model)
    proj_params = [p for _, p in projected]
    plain_params = [p for _, p in plain]
    lr, rank, gap = 1e-3, args.rank, args.gap
    ours_groups = lambda: fullrank.param_groups(model, rank=rank, target_modules=TARGET_MODULES, update_proj_gap=gap)  # noqa: E731
    galore_style = lambda **extra: [  # noqa: E731
        {"params": plain_params},
        {"params": proj_params, "rank": rank, "update_proj_gap": gap, "proj_type": "std", **extra},
    ]
    rows: dict = {}
    rows["adamw_foreach"] = lambda: torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
    rows["adamw_forloop"] = lambda: torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    rows["adamw_fused"] = lambda: torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    rows["galore (ours)"] = lambda: fullrank.GaLore(ours_groups(), lr=lr, scale=GALORE_SCALE)
    rows["fira (ours)"] = lambda: fullrank.Fira(ours_groups(), lr=lr, scale=GALORE_SCALE)
    capturable = dict(capturable=True, nonfinite="skip")  # no host read in a steady step
    rows["galore (ours, capturable)"] = lambda: fullrank.GaLore(ours_groups(), lr=lr, scale=GALORE_SCALE, **capturable)
    rows["fira (ours, capturable)"] = lambda: fullrank.Fira(ours_groups(), lr=lr, scale=GALORE_SCALE, **capturable)
    if "apollo" in fullrank.optimizer_methods():
        rows["apollo (ours)"] = lambda: fullrank.make_optimizer("apollo", ours_groups(), lr=lr)
        if "projection_storage" in fullrank.SubspaceAdamW.option_table():  # P stored, not regenerated from its seed
            rows["apollo (ours, stored P)"] = lambda: fullrank.make_optimizer("apollo", ours_groups(), lr=lr,
                                                                              projection_storage="matrix")

    def fira_pkg():
        from fira import FiraAdamW  # galore-style groups, but the key is "alpha"

        return FiraAdamW(galore_style(alpha=GALORE_SCALE), lr=lr, no_deprecation_warning=True)

    def galore_pkg():
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(galore_style(scale=GALORE_SCALE), lr=lr, no_deprecation_warning=True)

    def apollo_pkg():
        from apollo_torch import APOLLOAdamW

        return APOLLOAdamW(galore_style(scale=APOLLO_SCALE, proj="random", scale_type="channel"), lr=lr)

    def pytorch_optimizer_pkg(name):
        def make():  # pytorch-optimizer 4.x: galore-style groups with "projection_type" (see docs/benchmarks.md)
            import pytorch_optimizer

            return getattr(pytorch_optimizer, name)(galore_style(scale=GALORE_SCALE, projection_type="std"), lr=lr)
        return make

    rows["FiraAdamW (fira)"] = fira_pkg
    rows["GaLoreAdamW (galore-torch)"] = galore_pkg
    rows["APOLLOAdamW (apollo-torch)"] = apollo_pkg
    rows["GaLore (pytorch-optimizer)"] = pytorch_optimizer_pkg("GaLore")
    rows["Fira (pytorch-optimizer)"] = pytorch_optimizer_pkg("Fira")

    if args.rows:  # a subset (AdamW foreach kept: the ratios are to it)
        rows = {n: make for n, make in rows.items() if n == "adamw_foreach" or any(k in n for k in args.rows)}
    built = {}
    for name, make in rows.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[name] = make()
        except ImportError as exc:
            built[name] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # a peer failing to build is a row, not a crash
            built[name] = f"error: {type(exc).__name__}: {exc}"
    return built


def is_projected(name: str) -> bool:
    return not name.startswith("adamw")


def safe_step(opt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--gap", type=int, default=200, help="T: steps between projection refreshes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per optimizer (≥ 20)")
    ap.add_argument("--per-turn", type=int, default=2)
    ap.add_argument("--refresh-reps", type=int, default=3)
    ap.add_argument("--e2e-steps", type=int, default=10, help="timed forward+backward+step per optimizer")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--projected-only", action="store_true",
                    help="time the projected matrices alone: the plain parameters' gradients are dropped")
    ap.add_argument("--rows", nargs="+", default=None,
                    help="only the rows whose name contains one of these (e.g. --rows apollo APOLLO); default all")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/peers.json (cpu), peers_<device>_<dtype>.json otherwise")
    ap.add_argument("--plot", type=Path, default=None, help="default docs/img/<json stem>_speed.png")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    machine = tm.machine_info(device)  # before the measurements: its load average is the one at the start
    stem = "peers" if (args.device, args.dtype) == ("cpu", "float32") else f"peers_{args.device}_{args.dtype}"
    out = args.out or tm.RESULTS_DIR / f"{stem}.json"
    plot_path = args.plot or tm.DOCS_IMG_DIR / f"{out.stem}_speed.png"

    model, config = build_model(args, device, dtype)
    projected, plain = split(model)
    n_proj = sum(p.numel() for _, p in projected)
    n_plain = sum(p.numel() for _, p in plain)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if args.projected_only:  # every optimizer skips a parameter without a gradient
            for _, p in plain:
                p.grad = None
        return loss

    print(f"LLaMA {args.layers} layers: {n_proj / 1e6:.1f}M projected + {n_plain / 1e6:.1f}M plain parameters; "
          f"batch {args.batch}×{args.seq}; {args.dtype} on {device}, {torch.get_num_threads()} threads", flush=True)
    forward_backward()  # fixed gradients for the optimizer-step timing
    built = make_optimizers(model, args)
    opts = {n: o for n, o in built.items() if not isinstance(o, str)}
    for name, opt in opts.items():
        for _ in range(3):
            safe_step(opt)
        tm.synchronize(device)
        print(f"  warmed up {name}", flush=True)

    # optimizer step, steady state: round robin, rotating who goes first
    names = list(opts)
    steady = {n: [] for n in names}
    for r in range(math.ceil(args.steps / args.per_turn)):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for _ in range(args.per_turn):
                if len(steady[name]) < args.steps:
                    steady[name].append(tm.time_call(lambda: safe_step(opts[name]), device))
    print("  steady steps timed", flush=True)

    refresh = tm.time_refreshes({n: opts[n] for n in names if is_projected(n)}, device, args.refresh_reps,
                                args.gap, step=safe_step)
    print("  refresh steps timed", flush=True)

    state = {n: {"all_reachable": tm.state_bytes(o), "fullrank_memory": optimizer_state_bytes(o)} for n, o in opts.items()}

    # end to end: forward + backward + step, round robin
    e2e = {n: [] for n in names}
    e2e_parts = {n: {"forward_backward": [], "step": []} for n in names}
    fwd_bwd = []
    for r in range(args.e2e_steps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            tm.synchronize(device)
            t_fb = tm.time_call(forward_backward, device)
            t_step = tm.time_call(lambda: safe_step(opts[name]), device)
            fwd_bwd.append(t_fb)
            e2e[name].append(t_fb + t_step)
            e2e_parts[name]["forward_backward"].append(t_fb)
            e2e_parts[name]["step"].append(t_step)
    print("  end-to-end steps timed", flush=True)

    rows = {}
    for name, opt in built.items():
        if isinstance(opt, str):
            rows[name] = {"status": opt}
            continue
        s = tm.summary(steady[name])
        e = tm.summary(e2e[name])
        row = {"status": "ok", "step": s, "step_samples_s": steady[name], "e2e": e,
               "e2e_parts": {k: tm.summary(v) for k, v in e2e_parts[name].items()}, "state_bytes": state[name]}
        if name in refresh:
            row["refresh"] = tm.summary(refresh[name]["refresh"])
            row["refresh_samples_s"] = refresh[name]
            row["refresh_extra_s"] = tm.summary(refresh[name]["extra"])["median_s"]
            row["step_amortised_s"] = tm.amortised(s["median_s"], row["refresh_extra_s"], args.gap)
            row["e2e_amortised_s"] = e["median_s"] + row["refresh_extra_s"] / args.gap
        else:
            row["step_amortised_s"] = s["median_s"]
            row["e2e_amortised_s"] = e["median_s"]
        rows[name] = row
    for ref in ("adamw_foreach", "adamw_forloop"):
        base = rows.get(ref, {})
        if base.get("status") != "ok":
            continue
        for row in rows.values():
            if row.get("status") == "ok":
                row[f"step_ratio_vs_{ref}"] = row["step_amortised_s"] / base["step_amortised_s"]
                row[f"e2e_ratio_vs_{ref}"] = row["e2e_amortised_s"] / base["e2e_amortised_s"]
                row[f"state_ratio_vs_{ref}"] = row["state_bytes"]["all_reachable"]["storage"] / base["state_bytes"]["all_reachable"]["storage"]

    result = {
        "benchmark": "peers",
        "command": "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "packages": {p: tm.package_version(p) for p in ("torch", "transformers", *PEER_PACKAGES.values())},
        "config": {"layers": args.layers, "hidden": 768, "intermediate": 2048, "heads": 12, "vocab": 32000,
                   "batch": args.batch, "seq": args.seq, "rank": args.rank, "gap": args.gap, "dtype": args.dtype,
                   "lr": 1e-3, "weight_decay": 0.0, "galore_fira_scale": GALORE_SCALE, "apollo_scale": APOLLO_SCALE,
                   "projected_params": n_proj, "plain_params": n_plain, "steps": args.steps,
                   "e2e_steps": args.e2e_steps, "refresh_reps": args.refresh_reps,
                   "projected_only": args.projected_only},
        "forward_backward": tm.summary(fwd_bwd),
        "rows": rows,
    }
    tm.finish(result, out, plot_path, print_report, plot)
    return result


def print_report(result: dict) -> None:
    print(f"\n{'optimizer':28s} {'step ms':>8s} {'refresh+ ms':>11s} {'amort ms':>9s} {'×AdamW fe':>9s} "
          f"{'e2e ms':>8s} {'e2e ×AdamW fe':>13s} {'state MiB':>10s}")
    for name, r in result["rows"].items():
        if r.get("status") != "ok":
            print(f"{name:28s} {r['status']}")
            continue
        extra = r.get("refresh_extra_s")
        print(f"{name:28s} {r['step']['median_s'] * 1e3:8.1f} {(extra * 1e3 if extra is not None else float('nan')):11.1f} "
              f"{r['step_amortised_s'] * 1e3:9.1f} {r.get('step_ratio_vs_adamw_foreach', float('nan')):9.2f} "
              f"{r['e2e_amortised_s'] * 1e3:8.1f} {r.get('e2e_ratio_vs_adamw_foreach', float('nan')):13.2f} "
              f"{tm.mib(r['state_bytes']['all_reachable']['storage']):10.1f}")
    print(f"forward+backward alone: {result['forward_backward']['median_s'] * 1e3:.1f} ms (median)")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in result["rows"].items() if r.get("status") == "ok"}
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = list(range(len(names)))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], [rows[n]["step"]["median_s"] * 1e3 for n in names], 0.4, label="steady step")
    ax.bar([i + 0.2 for i in x], [rows[n]["step_amortised_s"] * 1e3 for n in names], 0.4,
           label=f"amortised (refresh every {result['config']['gap']})")
    ax.set_ylabel("ms per optimizer.step()")
    ax.set_title("optimizer step", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    ratios = [rows[n].get("e2e_ratio_vs_adamw_foreach", float("nan")) for n in names]
    ax.bar(x, ratios, 0.6, color="tab:green")
    ax.axhline(1.0, color="k", lw=1)
    ax.set_ylabel("× torch AdamW (foreach)")
    ax.set_title("training step (forward + backward + step, amortised)", fontsize=10)
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    m, c = result["machine"], result["config"]
    where = m.get("gpu") or f"{m['cpu_model']}, {m['torch_threads']} threads"
    fig.suptitle(f"LLaMA {c['layers']} layers (130M widths), batch {c['batch']}×{c['seq']}, rank {c['rank']}, "
                 f"{c['dtype']} — {where}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
