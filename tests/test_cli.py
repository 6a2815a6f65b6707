"""`launch.cli`: which log lines the commands keep."""

import importlib.util
import logging
import os

from launch.cli import LibraryInfoFilter


def record(pathname: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_library_info_lines_are_left_out_and_everything_else_kept():
    keep = LibraryInfoFilter().filter
    for package, module in (("orbax", "checkpoint/checkpoint_manager.py"),
                            ("grain", "_src/python/dataset/dataset.py"),
                            ("jax", "_src/xla_bridge.py")):
        folder = list(importlib.util.find_spec(package).submodule_search_locations)[0]
        path = os.path.join(folder, module)
        assert not keep(record(path, logging.INFO)), package
        assert not keep(record(path, logging.DEBUG)), package
        assert keep(record(path, logging.WARNING)), package
    ours = os.path.join(os.path.dirname(__file__), os.pardir, "launch", "training", "loop.py")
    assert keep(record(os.path.abspath(ours), logging.INFO))
    # a checkout inside a folder named like one of the packages is not one of them
    assert keep(record("/home/me/jax/lightningdit/launch/train.py", logging.INFO))
    assert keep(record("/home/me/orbax_runs/launch/train.py", logging.INFO))


def test_orbax_item_metadata_warning_is_dropped_only_beside_a_step_metadata_file(tmp_path):
    from launch.params_io import METADATA_FILE, ItemMetadataNotice

    def warning(path):
        return logging.LogRecord("absl", logging.WARNING, "checkpoint.py", 1,
                                 "Metadata file does not exist: %s", (str(path),), None)

    keep = ItemMetadataNotice().filter
    step = tmp_path / "checkpoints" / "6"
    (step / "params").mkdir(parents=True)
    assert keep(warning(step / "params" / METADATA_FILE))  # not a manager's step: kept
    (step / METADATA_FILE).write_text("{}")
    assert not keep(warning(step / "params" / METADATA_FILE))
    assert keep(record(str(step / "params" / METADATA_FILE), logging.WARNING))  # other text
