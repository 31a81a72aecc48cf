"""The semantic checks of a job configuration, one module per concern.

Each check takes the composed configuration and returns its problems as sentences that
name the offending values and the fix; :mod:`nemo_upcycle.config.validate` runs them all
and reports every problem at once.
"""
