"""Serving a checkpoint's ``config.swaa`` outside ``generate``: vLLM (its CPU build) through a plugin.

``vllm_plugin`` is what vLLM loads (the ``vllm.general_plugins`` entry point ``swaa``) and what the plugin
computes, from swaa's own plan and reference backend; ``vllm_adapter`` is the one module that reads vLLM.
"""
