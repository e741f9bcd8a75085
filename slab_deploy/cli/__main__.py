"""`python -m slab_deploy.cli`: the same as the `slab-deploy` console script."""

from slab_deploy.cli import main

main()
