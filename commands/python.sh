# Sourced by the recipes in commands/: sets PYTHON, the interpreter they run. PYTHON from the
# environment if set; else the repository's .venv/bin/python (what `make demo` and `make test` create)
# when it exists, so a recipe works right after `make demo` without activating anything; else `python`
# from PATH (an activated virtual environment or conda env).
if [[ -z "${PYTHON:-}" ]]; then
    _repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ -x "$_repo/.venv/bin/python" ]]; then PYTHON="$_repo/.venv/bin/python"; else PYTHON=python; fi
    unset _repo
fi
