"""Train a tiny Llama on CPython's own standard library, stock and with ``infofuse.hf.patch``, offline on a CPU.

    python examples/train_tiny_lm.py                 # 200 steps each, PNG and table under build/tiny_lm/
    python examples/train_tiny_lm.py --steps 50      # shorter

1. A byte-level BPE with a 32k vocabulary is trained with ``tokenizers`` on the ``.py`` files of the running
   Python's standard library (no download), and the files are encoded once.
2. Two fresh processes train the same ~10M-parameter Llama (untied 32k head, built from a config in code) on the
   same batches from the same initial weights: one stock, one with ``infofuse.hf.patch(model)``. Each measures
   its time per step and its peak resident memory (RSS).
3. The parent draws both loss curves into a PNG and prints the table.

The head's logits (batch × sequence × 32000 floats, several copies in the stock backward) dominate such a model's
memory; the patched model never forms them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time

VOCAB = 32000


def train_tokenizer(out_dir: str) -> str:
    """The BPE and the encoded corpus (int32 token ids), cached under out_dir."""
    tok_path = os.path.join(out_dir, "bpe32k.json")
    ids_path = os.path.join(out_dir, "stdlib_ids.bin")
    if os.path.exists(tok_path) and os.path.exists(ids_path):
        return ids_path
    import numpy as np
    from tokenizers import ByteLevelBPETokenizer

    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True))
    files = [f for f in files if "site-packages" not in f and os.sep + "test" + os.sep not in f]
    t0 = time.perf_counter()
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train(files, vocab_size=VOCAB, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.save(tok_path)
    eot = tokenizer.token_to_id("<|endoftext|>")
    ids = []
    for enc in tokenizer.encode_batch([open(f, encoding="utf-8", errors="replace").read() for f in files]):
        ids.extend(enc.ids)
        ids.append(eot)
    np.asarray(ids, dtype=np.int32).tofile(ids_path)
    print(
        f"BPE {tokenizer.get_vocab_size()} tokens trained on {len(files)} files of {stdlib} and "
        f"{len(ids) / 1e6:.2f}M tokens encoded in {time.perf_counter() - t0:.1f} s"
    )
    return ids_path


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def run(mode: str, ids_path: str, steps: int, batch: int, seq: int, result_path: str) -> None:
    """One training run in this (fresh) process; writes losses, step times and peak RSS as JSON."""
    import numpy as np
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    tokens = torch.from_numpy(np.fromfile(ids_path, dtype=np.int32).astype(np.int64))
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "patched":
        from infofuse import hf

        hf.patch(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    g = torch.Generator().manual_seed(1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses, times = [], []
    columns = (TextColumn(f"[bold]{mode:8s}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task(mode, total=steps, loss=float("nan"))
        for _ in range(steps):
            starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=g)
            x = torch.stack([tokens[s : s + seq] for s in starts.tolist()])
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            progress.update(task, advance=1, loss=losses[-1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(result_path, "w") as f:
        json.dump(
            dict(mode=mode, losses=losses, times=times, peak_rss_mib=peak, rss_before_mib=rss_before,
                 params=n_params, batch=batch, seq=seq, threads=torch.get_num_threads()),
            f,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", default=os.path.join("build", "tiny_lm"), help="cache, results, PNG")
    parser.add_argument("--png", default=None, help="where to write the loss curves (default: OUT/loss_curves.png)")
    parser.add_argument("--run", choices=("stock", "patched"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ids_path = train_tokenizer(args.out)
    if args.run:
        run(args.run, ids_path, args.steps, args.batch, args.seq, os.path.join(args.out, f"{args.run}.json"))
        return

    results = {}
    for mode in ("stock", "patched"):  # each in a fresh process: its peak RSS is its own
        cmd = [sys.executable, __file__, "--run", mode, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--out", args.out]  # fmt: skip
        subprocess.run(cmd, check=True)
        with open(os.path.join(args.out, f"{mode}.json")) as f:
            results[mode] = json.load(f)
    report(results, args.png or os.path.join(args.out, "loss_curves.png"))


def report(results: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from rich.console import Console
    from rich.table import Table

    stock, patched = results["stock"], results["patched"]
    warm = min(10, len(stock["times"]) // 2)  # the first steps (allocator, thread pools) are left out of the timing
    t_stock = statistics.median(stock["times"][warm:])
    diff = max(abs(a - b) for a, b in zip(stock["losses"], patched["losses"], strict=True))
    console = Console(width=130)
    console.print(
        f"Llama, {stock['params'] / 1e6:.1f}M parameters (untied {VOCAB} head), batch {stock['batch']} × "
        f"{stock['seq']} tokens, float32, {stock['threads']} threads, torch {torch.__version__}, "
        f"{len(stock['losses'])} AdamW steps each"
    )
    table = Table("run", "peak RSS", "RSS before step 1", "time / step (median)", "÷ stock", "final loss")
    for name, r in (("stock", stock), ("infofuse.hf.patch", patched)):
        t = statistics.median(r["times"][warm:])
        table.add_row(name, f"{r['peak_rss_mib']:.0f} MiB", f"{r['rss_before_mib']:.0f} MiB", f"{t * 1e3:.0f} ms",
                      f"{t / t_stock:.2f}×", f"{r['losses'][-1]:.4f}")  # fmt: skip
    console.print(table)
    console.print(
        f"peak RSS patched ÷ stock: {patched['peak_rss_mib'] / stock['peak_rss_mib']:.2f}; "
        f"largest |loss difference| over the {len(stock['losses'])} steps: {diff:.2e}"
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(stock["losses"], label="stock", lw=2.5, alpha=0.6)
    ax.plot(patched["losses"], label="infofuse.hf.patch", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("tiny Llama on CPython's stdlib")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    console.print(f"loss curves: {png}")


if __name__ == "__main__":
    main()
