"""Built-in detector plugins; importing this package registers them."""
