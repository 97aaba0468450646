"""Moving models between llmforge and other runtimes' file formats."""
