#!/usr/bin/env bash
# Runs the weights-by-name tests (tests/test_hub.py, tests/test_hub_online.py: a fake Hub on
# 127.0.0.1, clean child processes) against several huggingface_hub releases, one table at the end.
#
#   bash tools/check_hub_versions.sh                 # the releases below
#   bash tools/check_hub_versions.sh 0.30.2 1.5.0    # others
#
# Run it from the virtual environment the test extra is installed in. Each release gets a small
# venv of its own that sees that environment's packages (a .pth line), with only
# huggingface_hub installed over them (--no-deps: its dependencies of every release covered here
# are in the test extra's environment). Needs PyPI. setup.py's `hub` extra bounds are the range
# checked here.
set -uo pipefail
cd "$(dirname "$0")/.."

versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
  versions=(0.26.0 0.36.2 1.0.0 1.33.0 2.0.0 2.4.0)
fi
base_site="$(python -c 'import site; print(site.getsitepackages()[0])')"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
results=()
for v in "${versions[@]}"; do
  venv="$root/hf-$v"
  python -m venv --without-pip "$venv"
  site_dir="$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
  echo "import site; site.addsitedir('$base_site')" > "$site_dir/zz_test_extra.pth"
  if ! python -m pip install --quiet --no-deps --target "$site_dir" "huggingface_hub==$v"; then
    results+=("$v|install failed"); continue
  fi
  got="$("$venv/bin/python" -c 'import huggingface_hub as h; print(h.__version__)')"
  # transformers pins its own huggingface_hub range: its parity test runs only in the main env.
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_hub.py tests/test_hub_online.py \
      -k 'not transformers' > "$root/log-$v.txt" 2>&1
  rc=$?
  results+=("$v|imported $got|pytest rc $rc|$(tail -1 "$root/log-$v.txt")")
  [ $rc -eq 0 ] || tail -40 "$root/log-$v.txt"
done
echo
echo "huggingface_hub|imported|pytest|summary"
printf '%s\n' "${results[@]}"
