"""Building blocks of the model definitions, each on sagellm.ops kernels."""
