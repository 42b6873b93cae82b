"""``python -m vask.bench``: the bench CLI before it is wired into ``vask``."""

from vask.bench.cli import bench

if __name__ == "__main__":
    bench()
