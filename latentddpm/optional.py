"""Imports of the packages that `pip install latentddpm` leaves out (they come with an extra).

The core (`LatentDDPMPipeline`, the models, the scheduler) needs none of them; a feature that does imports its
package here, where it is used, so a missing one fails with the extra to install instead of a bare
`ModuleNotFoundError`.
"""

import importlib
from types import ModuleType


def import_optional(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or raise an `ImportError` that names the extra of latentddpm that installs it.

    Args:
        module (`str`): the dotted module name, e.g. `"matplotlib.figure"`.
        extra (`str`): the extra of `pyproject.toml` that installs it, e.g. `"eval"`.
        feature (`str`): what needs it, for the message, e.g. `"latentddpm evaluate's plots"`.

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".", 1)[0]
        raise ImportError(
            f"{feature} needs `{package}`, which `pip install latentddpm` leaves out:"
            f" pip install 'latentddpm[{extra}]'"
        ) from error
