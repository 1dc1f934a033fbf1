"""Where HAQ's MobileNetV2 latency table lies: `../shared/data/haq` beside the checkout.

The `haq_table` and `mbv2_cloud` fixtures (tests/conftest.py) read it.
"""

import os

HAQ_TABLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "haq",
                         "qmobilenetv2_imagenet100_batch16_latency_table.npy")
