#!/usr/bin/env python
"""Submit a catdpo-ray job to a Ray cluster; see :mod:`catdpo_ray.submit`.

    RAY_ADDRESS=http://<head>:8265 python scripts/submit.py jobs/llama2_7b_pku.yaml [key=value ...]
    python scripts/submit.py --command tune jobs/sweep_eta_eps_7b.yaml --wait
    python scripts/submit.py --dry-run jobs/tiny_cpu.yaml   # print the `ray job submit` command
"""

from catdpo_ray.submit import main

if __name__ == "__main__":
    raise SystemExit(main())
