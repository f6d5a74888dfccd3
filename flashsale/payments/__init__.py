"""Payment providers behind one interface. Nothing here knows of Ray or the product actors."""
