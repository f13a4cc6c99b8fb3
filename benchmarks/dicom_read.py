"""Reading one CT as a DICOM series and as one Enhanced CT (multi-frame) file (issue 22).

A generated 512x512x200 int16 volume is written by the tests' writers (tests/test_readers.py,
tests/test_dicom_multiframe.py): a 200-file series with shuffled names, and one Enhanced CT file
with shuffled frames and a rescale per frame. Each round times finding the scan
(`expand_inputs`) and reading it (`load_volume`, checked equal to the volume) for both, in
turn; the first round (imports, first touch) is left out of the summary.

    python benchmarks/dicom_read.py [--rounds 7] [--slices 200]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--slices", type=int, default=200)
    args = p.parse_args()
    import test_dicom_multiframe as tm
    import test_readers as tr

    from hagan_tf.preprocess import expand_inputs, load_volume

    tr.SPACING = tm.SPACING = (1.0, 0.7, 0.7)
    shape = (args.slices, 512, 512)
    vol = np.clip(np.random.default_rng(0).normal(-300, 400, shape), -1024, 3000).round()
    with tempfile.TemporaryDirectory() as root:
        tr.write_dicom_series(f"{root}/series", vol)
        tm.write_enhanced_ct(f"{root}/enhanced/ct.dcm", vol, per_frame_rescale=True)
        times = {"series": [], "enhanced": []}
        print(f"load average at the start: {os.getloadavg()[0]:.1f}")
        for rnd in range(args.rounds):
            for kind in times:
                cpu, start = time.process_time(), time.perf_counter()
                (_, source), = expand_inputs([f"{root}/{kind}"])
                found = time.perf_counter()
                volume, _ = load_volume(source)
                read = time.perf_counter()
                times[kind].append((found - start, read - found, time.process_time() - cpu))
                assert np.array_equal(volume, vol), kind
                print(f"round {rnd} {kind}: find {found - start:.3f} s, read {read - found:.3f} s")
    for kind, rows in times.items():
        rows = np.asarray(rows[1:])
        print(f"{kind}: find {np.median(rows[:, 0]):.3f} s, read median {np.median(rows[:, 1]):.3f}"
              f" s (best {rows[:, 1].min():.3f}), CPU median {np.median(rows[:, 2]):.2f} s "
              f"(best {rows[:, 2].min():.2f})")


if __name__ == "__main__":
    main()
