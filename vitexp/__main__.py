from vitexp.cli import main

main()
