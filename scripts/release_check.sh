#!/usr/bin/env bash
# The release check, locally as in the release workflow (.github/workflows/release.yml):
#
#   1. build the sdist and the wheel (in a build environment of its own) and check them: one of
#      each, named for fisher_optim.__version__ (the one place the version is written), the
#      wheel carries fisher_optim/py.typed, the sdist carries CHANGELOG.md and the tests, and
#      CHANGELOG.md's newest entry is this version; with --tag, the tag is "v" + the version
#      and that entry carries its release date (not "Unreleased");
#   2. install the wheel in a fresh virtual environment (the CPU build of torch first), import
#      it from there (not from the source tree) and run the demo;
#   3. with --timm, follow README.md's timm route there (torchvision from the index torch came
#      from, at constraints.txt's pin, then timm) and check that timm, torchvision's operators
#      and transformers.Trainer import;
#   4. with --tests, run the test suite from the unpacked sdist against the installed wheel.
#
# Usage: bash scripts/release_check.sh [--out DIR] [--dist DIR] [--build-only] [--tag vX.Y.Z]
#                                      [--torch VERSION] [--torch-index URL] [--timm]
#                                      [--tests [PYTEST ARGS...]]
#   --out DIR        where the sdist and wheel are written (default: a temporary folder)
#   --dist DIR       check and install the sdist and wheel already in DIR instead of building
#   --build-only     stop after step 1
#   --torch VERSION  the torch to test against (default: constraints.txt's pin)
#   --torch-index U  the index torch comes from, e.g. https://download.pytorch.org/whl/cpu
#                    (default: pip's configuration)
#   --timm           step 3 (with constraints.txt's torch: its torchvision pin is for that torch)
#   --tests ARGS     run the test suite; the arguments after it go to pytest (last option)
# Exits non-zero on the first failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/fisher-optim-release.XXXXXX")
trap 'rm -rf "$work"' EXIT
pytest_args=()
out="" dist="" build_only=0 tag="" torch_version="" torch_index="" tests=0 timm=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --dist) dist=$2; shift 2 ;;
    --build-only) build_only=1; shift ;;
    --tag) tag=$2; shift 2 ;;
    --torch) torch_version=$2; shift 2 ;;
    --torch-index) torch_index=$2; shift 2 ;;
    --timm) timm=1; shift ;;
    --tests) tests=1; shift; pytest_args=("$@"); break ;;
    *) echo "release_check: unknown argument '$1' (see the usage at the top of $0)" >&2; exit 2 ;;
  esac
done
start=$SECONDS
step() { echo; echo "=== [$((SECONDS - start))s] $*"; }
fail() { echo "release_check: $*" >&2; exit 1; }

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/fisher_optim/__init__.py")
[ -n "$version" ] || fail "no __version__ = \"...\" line in fisher_optim/__init__.py"
echo "fisher_optim $version"
if [ -n "$tag" ] && [ "$tag" != "v$version" ]; then
  fail "the tag '$tag' is not 'v$version' (fisher_optim.__version__): bump the version or retag"
fi
heading=$(grep -m 1 -E '^## \[[0-9]' "$repo/CHANGELOG.md")
changelog=$(echo "$heading" | sed -E 's/^## \[([^]]*)\].*/\1/')
[ "$changelog" = "$version" ] || fail "CHANGELOG.md's newest entry is $changelog, not $version"
if [ -n "$tag" ] && ! echo "$heading" | grep -qE '^## \[[^]]+\] - [0-9]{4}-[0-9]{2}-[0-9]{2}$'; then
  fail "CHANGELOG.md's entry '$heading' has no release date: write '## [$version] - YYYY-MM-DD'"
fi

if [ -z "$dist" ]; then
  step "build the sdist and the wheel"
  dist=${out:-$work/dist}
  python -m venv "$work/build-env"
  "$work/build-env/bin/pip" install -q build
  (cd "$repo" && "$work/build-env/bin/python" -m build --sdist --wheel --outdir "$dist" .)
fi
dist=$(cd "$dist" && pwd)

step "check the sdist and the wheel in $dist"
sdist=$dist/fisher_optim-$version.tar.gz
wheel=$dist/fisher_optim-$version-py3-none-any.whl
[ -f "$sdist" ] || fail "no $sdist"
[ -f "$wheel" ] || fail "no $wheel"
[ "$(find "$dist" -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' \) | wc -l)" -eq 2 ] \
  || fail "$dist holds more than one sdist and one wheel"
python - "$sdist" "$wheel" "$version" <<'PY'
import sys, tarfile, zipfile
sdist, wheel, version = sys.argv[1:]
top = f"fisher_optim-{version}/"
names = set(tarfile.open(sdist).getnames())
for need in ("CHANGELOG.md", "LICENSE", "README.md", "constraints.txt", "tests/conftest.py",
             "fisher_optim/py.typed", "scripts/release_check.sh"):
    assert top + need in names, f"the sdist lacks {need}"
members = set(zipfile.ZipFile(wheel).namelist())
assert "fisher_optim/py.typed" in members, "the wheel lacks fisher_optim/py.typed"
assert not any(m.startswith(("tests/", "benchmarks/")) for m in members), "tests in the wheel"
meta = zipfile.ZipFile(wheel).read(f"fisher_optim-{version}.dist-info/METADATA").decode()
assert f"Version: {version}\n" in meta, "the wheel's metadata has another version"
print(f"sdist: {len(names)} entries, CHANGELOG.md and the tests in; wheel: py.typed in")
PY
[ "$build_only" -eq 0 ] || { step "built and checked (--build-only)"; exit 0; }

step "a fresh virtual environment; torch ${torch_version:-from constraints.txt} first"
python -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
torch_version=${torch_version:-$(sed -n 's/^torch==//p' "$repo/constraints.txt")}
sed "s/^torch==.*/torch==$torch_version/" "$repo/constraints.txt" > "$work/constraints.txt"
pip install -q "torch==$torch_version" ${torch_index:+--index-url "$torch_index"}
pip install -q -c "$work/constraints.txt" "$wheel[demo]"

step "import the installed wheel and run the demo"
cd "$work"   # not the source tree: the import must find the installed wheel
python - "$version" <<'PY'
import pathlib, sys, torch, fisher_optim
assert fisher_optim.__version__ == sys.argv[1], fisher_optim.__version__
where = pathlib.Path(fisher_optim.__file__).parent
assert "site-packages" in where.parts, f"imported from {where}, not the installed wheel"
assert (where / "py.typed").is_file(), "py.typed is not installed"
print(f"fisher_optim {fisher_optim.__version__} from {where}, torch {torch.__version__}")
PY
python -m fisher_optim.demo

if [ "$timm" -eq 1 ]; then
  step "README.md's timm route: torchvision built for this torch, then timm"
  tv=$(sed -n 's/^torchvision==//p' "$work/constraints.txt")
  [ "$torch_version" = "$(sed -n 's/^torch==//p' "$repo/constraints.txt")" ] \
    || fail "--timm needs constraints.txt's torch (its torchvision==$tv is built for that torch)"
  pip install -q "torch==$torch_version" "torchvision==$tv" ${torch_index:+--index-url "$torch_index"}
  pip install -q -c "$work/constraints.txt" timm transformers
  python - <<'PY'
import torch, torchvision, torchvision.ops, timm.optim
from transformers import Trainer  # fails when torchvision's operators do not load
from fisher_optim.integrations.timm import TIMM_NAMES, register_timm_optimizers
register_timm_optimizers()
assert set(TIMM_NAMES) <= set(timm.optim.list_optimizers("fisher*"))
boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
assert torchvision.ops.nms(boxes, torch.ones(1), 0.5).tolist() == [0]
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}:"
      f" torchvision's operators, timm's factory and transformers.Trainer load")
PY
fi

if [ "$tests" -eq 1 ]; then
  step "the test suite from the sdist, against the installed wheel"
  pip install -q -c "$work/constraints.txt" "$wheel[test]"
  mkdir "$work/src" && tar -xzf "$sdist" -C "$work/src" --strip-components 1
  rm -rf "$work/src/fisher_optim"   # the tests import the installed package
  (cd "$work/src" && python -m pytest tests -q -p no:cacheprovider ${pytest_args[@]+"${pytest_args[@]}"} \
    && python -m pytest -q -p no:cacheprovider --doctest-modules --pyargs fisher_optim)
fi
step "release check passed: fisher_optim $version"
