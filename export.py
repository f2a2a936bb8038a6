"""Export a trained model to ONNX: clips (B, T, 3, H, W) float32 normalised -> retrieval feature (B, 2048).

    python export.py --checkpoint runs/ste_mars/last.pt --out model.onnx [--clip-len 8 --height 256 --width 128]
    python export.py --checkpoint STE_NVAN.pth --original-arch ste_nvan --out ste_nvan.onnx   # released models

The batch axis is dynamic; T, H and W are fixed in the graph (default: the checkpoint's). After writing, the file
is run with onnxruntime on the CPU and compared with PyTorch (max |difference| / max |feature| must stay below
1e-4), unless --no-check. Bad input ends with one line and exit code 2; the output appears only when complete.
--out is checked before any work (stenvan.outputs): it never replaces the checkpoint or any file that is not an
earlier export (a checkpoint, a manifest, someone's file); replacing an earlier export takes --force.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="stenvan checkpoint, or an original one (--original-arch)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--original-arch", choices=("baseline", "nvan", "ste_nvan"),
                        help="the checkpoint is one released by the original STE-NVAN project, of this model")
    parser.add_argument("--clip-len", type=int, help="frames per clip T (default: the checkpoint's; 8 for originals)")
    parser.add_argument("--height", type=int, help="input height (default: the checkpoint's; 256 for originals)")
    parser.add_argument("--width", type=int, help="input width (default: the checkpoint's; 128 for originals)")
    parser.add_argument("--attention", choices=("fused", "reference"),
                        help="non-local attention in the graph (default: the model's, fused; reference if the "
                             "fused one fails to export)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    args = parser.parse_args(argv)

    import os

    from stenvan.checkpoint import CheckpointError
    from stenvan.errors import error_line
    from stenvan.evaluation.evaluate import load_model_for_eval
    from stenvan.inference.export import compare_with_onnxruntime, export_onnx
    from stenvan.outputs import ONNX_MODEL, check_output

    unchecked = None
    try:
        # Before any work: never over the checkpoint, a manifest or anything but an earlier export.
        out = check_output(args.out, ONNX_MODEL, {"--checkpoint": args.checkpoint}, args.force, command="export.py")
        unchecked = out.with_name(f".{out.name}.{os.getpid()}.unchecked")  # renamed to --out once it passed the check
        model, settings = load_model_for_eval(args.checkpoint, args.original_arch)
        settings.update({k: v for k, v in (("clip_len", args.clip_len), ("height", args.height),
                                           ("width", args.width)) if v is not None})
        size = {k: settings[k] for k in ("clip_len", "height", "width")}
        if size["height"] < 16 or size["width"] < 16 or size["height"] % 16 or size["width"] % 16:
            raise ValueError(f"height and width must be positive multiples of 16, got {size['height']}x{size['width']}")
        model.check_clip_length(size["clip_len"])  # before the (slow) export
        export_onnx(model, unchecked, attention=args.attention, metadata={"arch": settings["arch"]}, **size)
        if not args.no_check:
            check = compare_with_onnxruntime(model, unchecked, **size)
            if not check["relative_error"] < 1e-4:
                print(f"export: error: the exported graph differs from PyTorch by {check['relative_error']:.2e} of "
                      f"max |feature| (> 1e-4); nothing written", file=sys.stderr)
                return 1
        os.replace(unchecked, out)
    except (CheckpointError, ValueError, ImportError, OSError) as e:
        print(f"export: error: {error_line(e, 'rerun')}", file=sys.stderr)
        return 2
    finally:
        if unchecked is not None:
            unchecked.unlink(missing_ok=True)
    print(f"exported {settings['arch']} (T={size['clip_len']}, {size['height']}x{size['width']}, dynamic batch) "
          f"-> {out}")
    if not args.no_check:
        print(f"onnxruntime vs PyTorch on {check['batch']} random clips: max |difference| {check['max_abs_error']:.2e}"
              f" = {check['relative_error']:.2e} of max |feature|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
