"""Datasets for quantization experiments: prepared with tfds, read without TF.

::

    splits = haqjax.data.load("fashion_mnist", val_size=5000)
    for batch in haqjax.data.batches(splits.train, batch_size=128, seed=0,
                                     epoch=0, shuffle=True,
                                     drop_remainder=True):
      ...  # batch["image"] float32 [128, 28, 28, 1], batch["label"] int32 [128]

Datasets: `digits` (bundled with scikit-learn), `fashion_mnist`, `cifar10`,
`imagenet2012`; the user's own arrays or batches through `from_arrays` and
`as_split` (`haqjax.data.arrays`). Prepared data lives in `data_dir`
(`$HAQJAX_DATA_DIR`, else `~/.cache/haqjax/datasets`); source files are
looked for in `manual_dir` and in each dataset's standard places. Nothing is
downloaded.
"""

from haqjax.data.arrays import as_split
from haqjax.data.arrays import from_arrays
from haqjax.data.errors import CorruptDataError
from haqjax.data.errors import DataNotFoundError
from haqjax.data.pipeline import Batch
from haqjax.data.pipeline import batches
from haqjax.data.pipeline import num_batches
from haqjax.data.pipeline import steps_per_epoch
from haqjax.data.preparation import PreparedDataset
from haqjax.data.preparation import default_data_dir
from haqjax.data.preparation import prepare
from haqjax.data.specs import DATASETS
from haqjax.data.specs import DatasetSpec
from haqjax.data.specs import get_spec
from haqjax.data.splits import Split
from haqjax.data.splits import Splits
from haqjax.data.splits import clear_cache
from haqjax.data.splits import load
