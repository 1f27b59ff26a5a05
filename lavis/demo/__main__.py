from lavis.demo.run import main

main()
