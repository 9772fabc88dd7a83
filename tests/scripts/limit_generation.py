"""Generate a dataset whose writes start failing (file size limit) when shard FAIL_AT is written (-1 = never).

    python tests/scripts/limit_generation.py MODEL OUT GENERATE_CONFIG_JSON FAIL_AT
"""

import sys

import compactlm.formats.generated as fmt
import compactlm.generation.dataset as D
from compactlm.config import GenerateConfig
from tests.scripts.faults import limit_writes

model, out, cfg, fail_at = sys.argv[1:5]
real = fmt.write_shard


def write_shard(path, *a, **kw):
    if int(fail_at) >= 0 and path.name == fmt.SHARD_NAME.format(int(fail_at)):
        limit_writes(512)
    return real(path, *a, **kw)


fmt.write_shard = write_shard
D.generate_dataset(model, GenerateConfig.model_validate_json(cfg), out, seed=0, progress=False)
