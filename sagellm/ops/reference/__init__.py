"""Pure-torch reference implementations of the sagellm ops, readable and computed in fp32/fp64."""
