"""dyprag: dynamic parametric RAG (a parameter translator from documents to FFN LoRAs).

Importing the package fixes the CPU arithmetic to the AVX2 kernels of ATen and MKL (unless
``ATEN_CPU_CAPABILITY`` / ``MKL_CBWR`` are already set), so a seeded CPU run gives the same
numbers on every x86-64 machine with AVX2 and the same core count. Without it, torch and MKL
pick AVX-512 or AVX2 code by the CPU they find; the two round differently, and training
amplifies last-bit differences into a different F1 table. The cost is about 15% of CPU speed;
set ``ATEN_CPU_CAPABILITY=avx512 MKL_CBWR=AUTO`` to trade reproducibility for it. Both are
read when torch first runs such a kernel, so this holds even when torch was imported first.
"""

import os
import platform

if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2")
