"""Child-process entry for onnxruntime's `quant_pre_process`; run as a script, so it imports nothing from `app`.

Usage: python -P preprocess_child.py INPUT OUTPUT [--skip-symbolic-shape]
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target, *flags = argv
    quant_pre_process(source, target, skip_symbolic_shape="--skip-symbolic-shape" in flags)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
