"""The config of an existing dba_jax workdir (e.g. one `dba-convert` made from a Hugging Face directory): its model,
data and tokenizer, with today's defaults for fields added since. The variant is the workdir's path; override the
training fields as usual, and start from its params with train.init_from (a bfloat16 workdir, from dba-convert
--dtype bf16, trains in float32: model.param_dtype is reset here and init_from widens the params):

  dba-train --config=configs/from_workdir.py:runs/llama-3.2-1b --config.train.init_from=runs/llama-3.2-1b \
            --config.data.source=text --config.data.train_path=train.txt --workdir=runs/llama-3.2-1b-ft
"""
from dba_jax.config import lock
from dba_jax.loading import read_config


def get_config(workdir: str = ""):
  if not workdir:
    raise ValueError("configs/from_workdir.py needs the workdir as its variant: --config=configs/from_workdir.py:DIR")
  c = read_config(workdir)
  c.model.param_dtype = "float32"
  return lock(c)
