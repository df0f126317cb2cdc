"""Device side: what runs on each board of the fleet."""
