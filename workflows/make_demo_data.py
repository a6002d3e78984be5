"""Make the demo's synthetic point set: a 3-D mixture of Gaussian blobs, stored as a zarr group.

    python workflows/make_demo_data.py demo-data/blobs.zarr --n 50000

The group holds ``points`` (N, 3) float64 chunked by 8192 rows, and ``weights`` (N,) summing to 1.
"""

import argparse

import numpy as np
import zarr


def make_blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0, 0.0], [3.0, 1.0, -1.0], [-2.0, 2.5, 1.5]])
    labels = rng.integers(0, len(centers), size=n)
    return centers[labels] + rng.normal(scale=0.6, size=(n, 3))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="demo-data/blobs.zarr")
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    points = make_blobs(args.n, args.seed)
    group = zarr.open_group(args.out, mode="w")
    group.create_array("points", data=points, chunks=(8192, 3), dimension_names=("point", "dim"))
    group.create_array("weights", data=np.full(args.n, 1.0 / args.n), chunks=(8192,),
                       dimension_names=("point",))
    print(f"wrote {args.out}: points {points.shape}, weights summing to 1")


if __name__ == "__main__":
    main()
