//! The proto texts printed from descriptors define exactly what the
//! descriptors do: compiled again with protox, every file of the catalog's
//! descriptor set comes out the same (comments aside).

use std::collections::BTreeMap;

use eventfold_schemas::proto_text::{embedded_source, print_file, proto_text};
use prost::Message as _;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};
use protox::file::{File, FileResolver};

struct Printed(BTreeMap<String, String>);

impl FileResolver for Printed {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.0.get(name) {
            Some(text) => File::from_source(name, text),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

fn catalog() -> FileDescriptorSet {
    FileDescriptorSet::decode(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap()
}

/// Comments aside, and options that prost-types does not model (e.g.
/// descriptor.proto's `retention`, `targets`, `edition_defaults`) leave an
/// empty options message: the same as none.
fn without_source_info(mut file: FileDescriptorProto) -> FileDescriptorProto {
    file.source_code_info = None;
    clear_empty(&mut file.options);
    file.message_type.iter_mut().for_each(message);
    file.enum_type.iter_mut().for_each(enumeration);
    file.extension.iter_mut().for_each(|f| clear_empty(&mut f.options));
    for service in &mut file.service {
        clear_empty(&mut service.options);
        service.method.iter_mut().for_each(|m| clear_empty(&mut m.options));
    }
    file
}

fn message(m: &mut DescriptorProto) {
    clear_empty(&mut m.options);
    m.field.iter_mut().chain(&mut m.extension).for_each(|f| clear_empty(&mut f.options));
    m.nested_type.iter_mut().for_each(message);
    m.enum_type.iter_mut().for_each(enumeration);
    m.extension_range.iter_mut().for_each(|r| clear_empty(&mut r.options));
    m.oneof_decl.iter_mut().for_each(|o| clear_empty(&mut o.options));
}

fn enumeration(e: &mut EnumDescriptorProto) {
    clear_empty(&mut e.options);
    e.value.iter_mut().for_each(|v| clear_empty(&mut v.options));
}

fn clear_empty<T: Default + PartialEq>(options: &mut Option<T>) {
    if options.as_ref().is_some_and(|o| *o == T::default()) {
        *options = None;
    }
}

/// The first lines where two descriptors differ.
fn diff(a: &FileDescriptorProto, b: &FileDescriptorProto) -> String {
    let (a, b) = (format!("{a:#?}"), format!("{b:#?}"));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    let from = first.saturating_sub(8);
    format!(
        "compiled again:\n{}\noriginal:\n{}",
        a[from..(first + 4).min(a.len())].join("\n"),
        b[from..(first + 4).min(b.len())].join("\n")
    )
}

fn compile(texts: BTreeMap<String, String>) -> BTreeMap<String, FileDescriptorProto> {
    let names: Vec<String> = texts.keys().cloned().collect();
    let mut compiler = protox::Compiler::with_file_resolver(Printed(texts));
    compiler.include_imports(true).include_source_info(false);
    for name in &names {
        if let Err(e) = compiler.open_file(name) {
            panic!("{name} does not compile: {e:?}");
        }
    }
    compiler.file_descriptor_set().file.into_iter().map(|f| (f.name().to_owned(), without_source_info(f))).collect()
}

#[test]
fn printed_files_compile_to_the_same_descriptors() {
    let set = catalog();
    assert!(set.file.iter().any(|f| f.name() == "google/protobuf/descriptor.proto"));
    let texts = set.file.iter().map(|f| (f.name().to_owned(), print_file(f))).collect();
    let compiled = compile(texts);
    for original in set.file {
        let name = original.name().to_owned();
        let again = compiled.get(&name).unwrap_or_else(|| panic!("{name} is missing"));
        let original = without_source_info(original);
        assert!(*again == original, "{name}: {}", diff(again, &original));
    }
}

#[test]
fn the_registered_texts_are_our_sources_and_printed_imports() {
    let set = catalog();
    let texts: BTreeMap<String, String> = set.file.iter().map(|f| (f.name().to_owned(), proto_text(f))).collect();
    for (name, text) in &texts {
        if name.starts_with("eventfold/") {
            assert_eq!(Some(text.as_str()), embedded_source(name), "{name}");
        } else {
            assert!(name.starts_with("google/"), "{name} is neither ours nor a google import");
            assert!(embedded_source(name).is_none());
        }
    }
    // Together they compile to the catalog again.
    let compiled = compile(texts);
    for original in set.file {
        let original = without_source_info(original);
        assert!(compiled[original.name()] == original, "{}", original.name());
    }
}
