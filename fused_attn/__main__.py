"""Command line: `python -m fused_attn check [...]` / `plot-mask [...]` / `explore [...]` (also installed as
`fused-attn`)."""
import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fused-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="numerics report of the Triton kernels against the float64 reference")
    check.add_argument("--full", action="store_true", help="a larger sweep: more shapes, masks and dtypes (default: "
                       "a small one)")
    check.add_argument("--save-baseline", metavar="FILE", help="write the measured errors as JSON")
    check.add_argument("--baseline", metavar="FILE", help="fail where an error grew more than 2x over this JSON")
    pm = sub.add_parser("plot-mask", help="draw the attention mask and the tiles the kernels skip to a PNG")
    pm.add_argument("--seqlen-q", type=int, required=True)
    pm.add_argument("--seqlen-k", type=int, help="default: seqlen-q")
    pm.add_argument("--causal", action="store_true")
    pm.add_argument("--window", type=int, nargs=2, default=(-1, -1), metavar=("LEFT", "RIGHT"))
    pm.add_argument("--alignment", choices=["bottom_right", "top_left"], default="bottom_right")
    pm.add_argument("--block", type=int, nargs=2, default=(16, 16), metavar=("M", "N"), help="tile size drawn")
    pm.add_argument("--out", default="mask.png")
    ex = sub.add_parser("explore", help="a web page (Streamlit) showing what a model attends to, token by token")
    ex.add_argument("--model", metavar="DIR", default="", help="a local Hugging Face causal LM directory "
                    "(default: a tiny random demo model; nothing is downloaded)")
    ex.add_argument("--port", type=int, default=8501)
    args = parser.parse_args(argv)
    if args.command == "explore":
        return explore(args.model, args.port)
    if args.command == "plot-mask":
        from fused_attn import viz
        viz.plot_mask(args.seqlen_q, args.seqlen_k or args.seqlen_q, args.causal, tuple(args.window),
                      args.alignment, *args.block, path=args.out)
        print(f"wrote {args.out}")
        return 0

    import torch

    from fused_attn import kernels
    if not torch.cuda.is_available() and not kernels.interpreter_active() and os.environ.get("TRITON_INTERPRET") != "1":
        # No GPU: run the same kernels on the CPU through the Triton interpreter. TRITON_INTERPRET must be set
        # before the kernels are defined, so start again with it (the library itself never sets it).
        print("no CUDA GPU: running the kernels through the Triton interpreter (TRITON_INTERPRET=1)", flush=True)
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "fused_attn", *argv], dict(os.environ, TRITON_INTERPRET="1"))
    from fused_attn import check as check_mod
    return check_mod.run(full=args.full, save_baseline=args.save_baseline, baseline=args.baseline)


def explore(model_dir: str, port: int) -> int:
    """Serve fused_attn/explore/app.py with Streamlit (an optional extra): this process becomes the server."""
    import importlib.util
    if importlib.util.find_spec("streamlit") is None:
        print("the explorer needs Streamlit: pip install -e \".[app]\" (or pip install streamlit)", file=sys.stderr)
        return 2
    import torch
    env = dict(os.environ, FUSED_ATTN_EXPLORE_MODEL=model_dir)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # no GPU: the page runs the kernels through the interpreter
    app = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore", "app.py")
    cmd = [sys.executable, "-m", "streamlit", "run", app, "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false"]
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)


if __name__ == "__main__":
    sys.exit(main())
