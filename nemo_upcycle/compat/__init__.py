"""The one room for patches of torch's, megatron-core's and NeMo's internals.

Each module here changes another package's private code for the release it was written for,
and states that release in :data:`nemo_upcycle.compat.versions.PATCHES`; :func:`~nemo_upcycle.compat.versions.require`
checks the installed versions before the patch changes anything (a user error, exit 2, otherwise).

* ``cpu``: megatron-core on a CPU-only torch with gloo (applied only without a GPU);
* ``nemo_cpu``: NeMo's trainer on a CPU-only torch (applied only without a GPU);
* ``nemo_strategy``: the training job's hooks into NeMo's MegatronStrategy (every machine).
"""
