"""FID / sFID / IS / precision / recall of a sample batch against a reference batch.

    python -m launch.evaluate --samples runs/xl/samples.npz \
        --reference VIRTUAL_imagenet256_labeled.npz \
        --inception pt_inception-2015-12-05-6726825d.pth --output runs/xl/metrics.json

Both files are in the ADM evaluator's layout (`arr_0` uint8 NHWC images and/or `mu`, `sigma`,
`mu_s`, `sigma_s` statistics); ADM's reference batches load as they are. The last line printed
is one JSON object with `fid` and, where the inputs allow, `sfid`, `is`, `precision`, `recall`.
When both files hold only statistics, no network is needed. Precision and recall use ADM's
float16 distances (`--pr_distances float32` for float32 ones). `--save_stats PATH` writes the
samples' statistics (a reference batch for later runs).

The features come from pytorch-fid's FID Inception ported to Flax (`eval_jax.inception`), the
TF 2015 graph the ADM evaluator uses, with that graph's own preprocessing (TF1's bilinear resize
to 299, then (x - 128) / 128; `--inception_preprocess pytorch_fid` for pytorch-fid's); batches
are sharded over every local device.
"""

from __future__ import annotations

import json
import time

from absl import flags, logging

from launch import cli

_SAMPLES = flags.DEFINE_string("samples", None, "Sample batch (.npz).", required=True)
_REFERENCE = flags.DEFINE_string("reference", None, "Reference batch (.npz).", required=True)
_INCEPTION = flags.DEFINE_string(
    "inception", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (needed when a batch "
    "holds images).")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the metrics JSON here.")
_SAVE_STATS = flags.DEFINE_string("save_stats", None,
                                  "Write the samples' feature statistics to this .npz.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 200, "Images per Inception batch (global).",
                                   lower_bound=1)
_PREPROCESS = flags.DEFINE_enum(
    "inception_preprocess", "adm", ["adm", "pytorch_fid"],
    "How images reach the Inception network: 'adm' as the ADM evaluator's TF graph (TF1 bilinear "
    "resize to 299, then (x - 128) / 128), matching its reference batches' statistics; "
    "'pytorch_fid' as pytorch-fid (upstream's quick FID and rFID tools).")
_PR_DISTANCES = flags.DEFINE_enum(
    "pr_distances", "float16", ["float16", "float32"],
    "Squared distances for precision / recall: rounded to float16 as in the ADM evaluator "
    "(float32 where a block overflows; see eval_jax.metrics), or float32.")
cli.path_flag("output")
cli.path_flag("save_stats")


def main(argv):
    del argv
    from launch import evaluation

    start = time.perf_counter()
    try:
        samples = evaluation.load_batch(_SAMPLES.value)
        reference = evaluation.load_batch(_REFERENCE.value)
    except evaluation.BatchFileError as e:
        raise cli.UserError(str(e)) from e
    needs_network = samples.images is not None or reference.images is not None
    extract = None
    if needs_network:
        if not _INCEPTION.value:
            raise cli.UserError("a batch holds images (arr_0): --inception=PATH to pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth is needed")
        extract = evaluation.inception_extractor(_INCEPTION.value, batch_size=_BATCH_SIZE.value,
                                                 preprocess=_PREPROCESS.value)
        extract = _logged(extract)
    if _SAVE_STATS.value:
        if samples.images is None:
            raise cli.UserError("--save_stats needs sample images (arr_0)")
        features = extract(samples.images)
        evaluation.save_statistics(_SAVE_STATS.value, features)
        samples.stats = evaluation.metrics.feature_statistics(features["pool"])
    try:
        result = evaluation.evaluate(samples, reference, extract,
                                     pr_distances=_PR_DISTANCES.value)
    except evaluation.BatchFileError as e:
        raise cli.UserError(str(e)) from e
    logging.info("evaluated in %.1fs", time.perf_counter() - start)
    line = json.dumps(result)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(line + "\n")
    print(line)


def _logged(extract):
    """Log the rate, and remember the last result (--save_stats and the metrics share it)."""
    last = {}

    def run(images):
        if last.get("images") is images:
            return last["out"]
        start = time.perf_counter()
        out = extract(images)
        seconds = time.perf_counter() - start
        logging.info("features of %d images in %.1fs (%.1f img/s)", len(images), seconds,
                     len(images) / max(seconds, 1e-9))
        last.update(images=images, out=out)
        return out

    return run


if __name__ == "__main__":
    cli.run(main)
