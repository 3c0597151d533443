"""Built-in baseline components: linear encoder, concat fusion, last-step gate, regression head."""
