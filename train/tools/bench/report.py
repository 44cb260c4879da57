"""Markdown tables of a ``bench.json`` result (what ``make bench`` prints and the README shows)."""

from __future__ import annotations

from train.tools.bench.trainer_memory import markdown as trainer_markdown

GPU_SAMPLES_PER_S = (
    80  # the loader rate one GPU needs for the SD1.5 step at 512 px (issue goal: 40% MFU on H100)
)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _g(x: float) -> str:
    return f"{x / 1e9:.0f}"


def _gflop(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.0f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    out = [
        f"Device: {m['device']} ({m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, "
        f"native CPU bf16: {m['native_cpu_bf16']}), torch {m['torch']}, {m['date']}, load average "
        f"{m['load_avg_1min']:.1f} at the start; mode {result['mode']}, {result['wall_s']:.0f} s.",
        "",
    ]
    lim = result["limits"]
    mm, mem = lim["matmul"], lim["memory"]
    out += _table(
        ["limit", "measured"],
        [
            [f"torch.mm {mm['float32']['n']}², fp32", f"{_g(mm['float32']['flops'])} GFLOP/s"],
            [f"torch.mm {mm['bfloat16']['n']}², bf16", f"{_g(mm['bfloat16']['flops'])} GFLOP/s"],
            [
                f"memory bandwidth ({mem['mib']} MiB copy, read + write)",
                f"{mem['bytes_per_s'] / 1e9:.1f} GB/s",
            ],
        ],
    )
    for name, entry in result.get("steps", {}).items():
        out += [
            "",
            f"**Step, {name}** ({entry['size']} px, batch {entry['batch']}, branch "
            f"{entry['branch_params'] / 1e6:.1f}M parameters; memory: {entry['memory']})",
            "",
        ]
        if "steps" in entry:
            rows = entry["steps"]
            ref = {r["optimizer"]: r for r in rows if r["precision"] == "fp32" and not r["checkpointing"]}
            base = ref.get("adamw", rows[0])
            out += _table(
                [
                    "optimizer",
                    "precision",
                    "ckpt",
                    "s/step",
                    "GFLOP/step",
                    "GFLOP/s",
                    "of matmul peak",
                    "of mm (same rounds)",
                    "peak tensors GiB",
                    "memory vs fp32 AdamW",
                ],
                [
                    [
                        r["optimizer"],
                        r["precision"],
                        "on" if r["checkpointing"] else "off",
                        f"{r['s_per_step']:.3f}",
                        _gflop(r["tflop_per_step"] * 1e3),
                        f"{r['tflops'] * 1e3:.0f}",
                        f"{r['fraction_of_matmul_peak']:.0%}",
                        f"{r['fraction_of_interleaved_mm']:.0%}",
                        f"{r['peak_tensor_gib']:.2f}" if "peak_tensor_gib" in r else "-",
                        f"{r['peak_tensor_gib'] / base['peak_tensor_gib'] - 1:+.0%}"
                        if "peak_tensor_gib" in r
                        else "-",
                    ]
                    for r in rows
                ],
            )
        if "optimizer_step" in entry:
            opt = entry["optimizer_step"]
            fused = opt["fused"]["s"]
            out += [
                "",
                "optimizer step alone (same gradients, interleaved): "
                + ", ".join(
                    f"{k} {v['s'] * 1e3:.1f} ms ({v['s'] / fused:.1f}x fused)" for k, v in opt.items()
                ),
            ]
        if "lightning" in entry:
            lt = entry["lightning"]
            out += [
                "",
                f"Lightning loop iteration / bare PyTorch loop (fp32 AdamW, {lt['steps']} steps each, "
                f"alternated): {lt['lightning_s']:.4f} / {lt['bare_s']:.4f} s = **{lt['ratio']:.3f}**",
            ]
    for entry in result.get("trainer_memory", []):
        out += ["", trainer_markdown(entry)]
    if "loader" in result:
        out += ["", "**Loader** (512 px, batch 2; official = the official collate on the main process)", ""]
        out += _table(
            ["source JPEG", "loader", "workers", "samples/s", "vs official", "samples per CPU-s", "batch MB"],
            [
                [
                    r["source"],
                    r["loader"].split("_")[0],
                    r["workers"],
                    r["samples_per_s"],
                    f"{r['vs_official']:.2f}x",
                    f"{r['samples_per_cpu_s']} ({r['cpu_vs_official']:.2f}x)"
                    if "samples_per_cpu_s" in r
                    else "-",
                    r["batch_mb"],
                ]
                for r in result["loader"]
            ],
        )
        per_core = [r for r in result["loader"] if r["loader"] == "ours_0w"]
        out += [
            "",
            "Cores per GPU for "
            + str(GPU_SAMPLES_PER_S)
            + " samples/s: "
            + ", ".join(f"{r['source']} {GPU_SAMPLES_PER_S / r['samples_per_cpu_s']:.1f}" for r in per_core)
            + " (from the per-CPU-second rate of the main-process loader).",
        ]
    pipe = result.get("pipeline")
    if pipe:
        out += [""]
        if "error" in pipe:
            out += [f"data pipeline bench failed: {pipe['error']}"]
        else:
            labels = ", ".join(
                f"{r['labeler']} {r.get('images_per_s', r.get('images_per_s_upper_bound'))}"
                for r in pipe["label"]
            )
            out += [f"labelling images/s: {labels}; shard write {pipe['shard_write']['mb_per_s']} MB/s"]
            for d in pipe.get("download", []):
                out += [
                    f"img2dataset on loopback, {d['processes']} process(es): {d['images_per_s_downloading']} "
                    f"images/s while downloading, {d['images_per_s_wall']} wall ({d['urls']} URLs)"
                ]
    if result.get("not_run"):
        out += ["", f"not run: {', '.join(result['not_run'])} (`--full`; see the memory notes)"]
    return "\n".join(out)
