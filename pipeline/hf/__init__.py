"""transformers' internals, in one place.

What this loader takes from transformers beyond its documented public API is reached only through this
package, so a release that moves one of them breaks here with one line naming the installed version and the
tested range (`unsupported`), never as a KeyError inside a stage. Each function notes the versions it was
checked on (docs/design.md, "transformers' internals in one package").

conversions.py (checkpoint keys to model tensors, from headers), tensor_parallel.py (the
model's own tensor-parallel plan and styles), modeling.py (model-class attributes, building
from a config, generation config, remote code), quantizers.py (transformers' bitsandbytes
quantizer and its module selection), version.py (the supported range).
"""

from .version import NEWEST_TESTED, OLDEST, installed, unsupported

__all__ = ["NEWEST_TESTED", "OLDEST", "installed", "unsupported"]
