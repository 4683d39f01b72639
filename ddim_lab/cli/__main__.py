from ddim_lab.cli.main import main

main()
