"""``python -m normrnn check FILE...``: a config file read and checked as the workflow would,
with the file, line and column of a YAML error (Snakemake's own message names neither) and
the key of an invalid value (:func:`~normrnn.pipeline.config.validate`)."""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, expand, validate


def load(path: str | Path) -> dict:
    """Read a config file; a YAML error names the file, line and column (Snakemake's own
    message, "Config file is not valid JSON or YAML", names neither)."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys, not {type(config).__name__}")
    return config


def main(argv=None) -> int:
    """``python -m normrnn check FILE...``: check config files as the workflow would, naming
    the file and line of a YAML error and the key of an invalid value; print the runs."""
    import argparse
    import collections

    parser = argparse.ArgumentParser(prog="python -m normrnn check", description=main.__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    failed = 0
    for path in parser.parse_args(argv).files:
        try:
            config = validate(load(path))
        except (ConfigError, OSError) as e:
            print(f"{path}: {e}" if isinstance(e, OSError) else e)
            failed += 1
            continue
        per_study = collections.Counter(study for study, _, _ in expand(config))
        studies = ", ".join(f"{s} {n}" for s, n in per_study.items())
        print(f"{path}: valid, {sum(per_study.values())} runs ({studies})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
