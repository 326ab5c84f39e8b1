"""Diagnostic: do a csrc/ file's kernels compile to the same machine code (sm_90a SASS) in the
working tree as at a git revision? For changes made without a GPU (refactors, opt-in variants
behind template flags): where every kernel that ran on the GPU is identical, what was tested
is what is committed.

    python benchmarks/diag/sass_diff.py ecf8ad0 csrc/sgmv_prefill.cu

Needs nvcc and cuobjdump + nvdisasm; without a CUDA toolkit that has them:
    pip download --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
and unzip both wheels, then set CUOBJDUMP=.../nvidia/cu13/bin/cuobjdump and
NVDISASM_PATH=.../nvidia/cu13/bin/nvdisasm. Prints one line a kernel; exit status 1 where a
kernel of the revision differs or is gone."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sass(csrc: Path, source: Path, out: Path) -> dict[str, list[str]]:
    """Kernel name (without the anonymous namespace's per-file tag) -> its instructions."""
    cubin = out / (source.stem + ".cubin")
    subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90a", f"-I{csrc}",
                    "--expt-relaxed-constexpr", "-cubin", "-o", str(cubin), str(source)], check=True)
    env = dict(os.environ)
    if "NVDISASM_PATH" in env:  # cuobjdump looks for nvdisasm on PATH
        env["PATH"] = str(Path(env["NVDISASM_PATH"]).parent) + os.pathsep + env.get("PATH", "")
    run = subprocess.run([env.get("CUOBJDUMP", "cuobjdump"), "-sass", str(cubin)], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit("cuobjdump failed: " + run.stderr.strip())
    dump = run.stdout
    kernels, name = {}, None
    for line in dump.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = re.sub(r"_GLOBAL__N__[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]{8}", "", m.group(1))
            kernels[name] = []
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m and name:
            kernels[name].append(m.group(1).strip())
    return kernels


def main():
    rev, rel = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_root = tmp / "old"
        old_root.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive, check=True)
        old = sass(old_root / "csrc", old_root / rel, tmp)
        new = sass(ROOT / "csrc", ROOT / rel, tmp)
    differ, matched = False, set()
    for name, code in old.items():
        twin = name
        if name not in new:  # template flags added last since: the kernel with them false
            twin = next((n for n in new if re.sub(r"(Lb0E)+(?=EEv)", "", n) == name), None)
        state = "gone" if twin is None else ("identical" if new[twin] == code else "DIFFERENT")
        matched.add(twin)
        differ |= state != "identical"
        print(f"{state:9s} {name}" + (f" (as {twin})" if twin not in (None, name) else ""))
    for name in new.keys() - matched:
        print(f"{'new':9s} {name}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
