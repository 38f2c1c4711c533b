"""transformers' internals, in one place.

What this loader takes from transformers beyond its documented public API (the key
conversion mapping and its ops, the tensor-parallel styles, model-class attributes such as
`_keep_in_fp32_modules` and the auto classes' model mapping, the bitsandbytes quantizer
objects, the generation-config hook, the remote-code importer) is reached only through this
package. A release that moves one of them then breaks here, with one line naming the
installed version and the tested range (`unsupported`), never as a KeyError inside a stage.
Each function notes the versions it was checked on; tests/test_hf_adapter.py keeps every
other module off transformers' private names, and scripts/compat.sh runs the suites that
depend on them against the oldest supported and the newest released transformers
(docs/compatibility.md).

conversions.py (checkpoint keys to model tensors, from headers), tensor_parallel.py (the
model's own tensor-parallel plan and styles), modeling.py (model-class attributes, building
from a config, generation config, remote code), quantizers.py (transformers' bitsandbytes
quantizer and its module selection), version.py (the supported range).
"""

from .version import NEWEST_TESTED, OLDEST, installed, unsupported

__all__ = ["NEWEST_TESTED", "OLDEST", "installed", "unsupported"]
