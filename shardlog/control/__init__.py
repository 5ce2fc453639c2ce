"""Control commands (rotate, delete, move, stop, start): the pure parsing and routing, and
the recorder's side that carries out rotate/delete/move on its branch."""
