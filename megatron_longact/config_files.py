"""Finding run configs: a path, or the name of an example config shipped with the package.

``--config`` accepts a YAML path (absolute or relative to the working directory) or the name of a
bundled example (``demo_cpu``, ``qwen3_8b_grpo``, ``model/tiny``, with or without ``.yaml``). The
examples are the files of the source tree's ``configs/`` folder; the wheel carries them as the
package ``megatron_longact.configs``, so a plain ``pip install`` finds them from any folder.
An existing file always wins over a bundled name.

Input paths inside a config (``PATH_FIELDS``) are resolved against the folder of the YAML file
that sets them, never against the working directory; paths given as command-line overrides are
relative to the working directory, as a shell user expects. Output folders (``output.dir``,
``checkpoint.dir``) stay relative to the working directory so that runs never write into the
installed package.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from megatron_longact.config import ConfigError

PATH_FIELDS = ("data.path", "data.tokenizer.path", "checkpoint.load_weights")


def bundled_dir() -> Path | None:
    """Folder of the shipped example configs: ``configs/`` inside the installed package (a wheel
    install), else the source tree's ``configs/`` (an editable install maps the package there)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return None


def bundled_names() -> list[str]:
    """Names accepted by ``--config`` besides paths, e.g. ``demo_cpu``, ``model/tiny``."""
    root = bundled_dir()
    if root is None:
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config(arg: str | Path) -> Path:
    """The YAML file ``--config arg`` names; ConfigError (with the closest names) otherwise."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    name = str(arg)
    if name.endswith((".yaml", ".yml")):
        name = name.rsplit(".", 1)[0]
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    root = bundled_dir()
    if root is not None and not Path(name).is_absolute():
        candidate = root / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    names = bundled_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"config file {arg} does not exist and is not the name of a bundled example"
                      f"{hint} (bundled: {', '.join(n for n in names if '/' not in n)})")
