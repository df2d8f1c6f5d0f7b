"""Executors and wire formats of LLM calls: the OpenAI and Anthropic protocols, as the proxy and llm_proxy jobs read them."""
