console.log("bundle: todo")
